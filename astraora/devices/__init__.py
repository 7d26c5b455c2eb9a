"""Black-box physical devices. A new device is one class plus one YAML file in conf/device/ (in your own
package's conf/device, put on Hydra's search path: docs/guide/own-device.md)."""

from astraora.devices.base import Device, Faults, NonIdealities, dense_transfer
from astraora.devices.dense import SLM, EntrywiseDevice, MatVec, MRRBank
from astraora.devices.monarch import Monarch
from astraora.devices.mzi import MZIClassical, MZIMesh

# the devices that ship with astraora, by their conf/device entry's name
BUILT_IN: dict[str, type[Device]] = {
    "matvec": MatVec,
    "slm": SLM,
    "mrr": MRRBank,
    "mzi": MZIMesh,
    "mzi_classical": MZIClassical,
    "monarch": Monarch,
}

__all__ = [
    "BUILT_IN",
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
