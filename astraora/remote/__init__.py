"""Hardware in the loop over the network: the device protocol (docs/PROTOCOL.md), the server
``astraora-device-server`` and the client device ``device=remote``."""

from astraora.remote.client import RemoteDevice, RemoteError
from astraora.remote.lab import DeviceInfo, LabDevice, SimulatedDevice
from astraora.remote.server import DeviceServer
from astraora.remote.token import TOKEN_ENV

__all__ = ["RemoteDevice", "RemoteError", "DeviceInfo", "LabDevice", "SimulatedDevice", "DeviceServer", "TOKEN_ENV"]
