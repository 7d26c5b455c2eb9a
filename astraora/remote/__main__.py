"""``python -m astraora.remote [overrides]``: the same as ``astraora-device-server``."""

from astraora.remote.server import main

main()
