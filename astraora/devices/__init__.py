"""Black-box physical devices. A new device is one class plus one YAML file in conf/device/ (in your own
package's conf/device, put on Hydra's search path: README, "Adding a device")."""

from astraora.devices.base import Device, Faults, NonIdealities, dense_transfer
from astraora.devices.dense import SLM, EntrywiseDevice, MatVec, MRRBank
from astraora.devices.monarch import Monarch
from astraora.devices.mzi import MZIClassical, MZIMesh

__all__ = [
    "Device",
    "Faults",
    "NonIdealities",
    "dense_transfer",
    "EntrywiseDevice",
    "MatVec",
    "MRRBank",
    "SLM",
    "MZIMesh",
    "MZIClassical",
    "Monarch",
]
