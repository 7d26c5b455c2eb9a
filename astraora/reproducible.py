"""One instruction-set path for PyTorch's CPU kernels, so that a run's numbers do not depend on the CPU.

PyTorch picks its CPU kernels by the processor: ATen's own vectorised kernels (softmax, log-softmax
and cross-entropy, attention …) for AVX2 or AVX-512 (``ATEN_CPU_CAPABILITY``), oneDNN's
(GELU, convolutions) for the widest instruction set present (``ONEDNN_MAX_CPU_ISA``), and MKL's BLAS
and LAPACK (matmul, bmm, einsum, SVD, QR) by instruction set and vendor (``MKL_CBWR``). The kernels
round differently, training amplifies the last bit, and so the default run (``python train.py``)
ended at a different test accuracy on an AVX-512 machine than on an AVX2 one (docs/PERFORMANCE.md,
"Reproducible numbers across CPUs"). The native tile kernels give the same bits everywhere by
themselves (devices/native.py: no floating-point contraction).

With ``ASTRAORA_REPRODUCIBLE=1`` :func:`apply` pins all three: ATen to its AVX2 kernels, oneDNN to
AVX2 at most, MKL to its conditional-numerical-reproducibility mode ``COMPATIBLE`` (the one code path
MKL runs alike on Intel and AMD processors). Every x86-64 CPU with AVX2 and FMA then computes the same
bits (a CPU without AVX2 runs ATen's and oneDNN's older kernels: its figure may still differ). The
price is speed: MKL's COMPATIBLE path is 2–5× slower on matrix products, ATen's AVX2 kernels up to
2× on attention (measurements in docs/PERFORMANCE.md). Variables the user has set are left as they are.

ATEN_CPU_CAPABILITY is read when torch is imported, MKL_CBWR and ONEDNN_MAX_CPU_ISA at their library's
first call, so :func:`apply` must run before anything imports torch: astraora/__init__.py calls it,
which every entry point (``python train.py``, ``astraora-train``, the scripts) imports before torch.
This module imports nothing heavy.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import MutableMapping

from astraora.errors import ConfigError  # no imports of its own

ENV = "ASTRAORA_REPRODUCIBLE"
# What the pinned path sets; each value is one every x86-64 CPU with AVX2 accepts.
SETTINGS: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's vectorised kernels: 8-wide, as on every AVX2 CPU
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's JIT kernels: no AVX-512 code (GELU's polynomial, convolutions)
    "MKL_CBWR": "COMPATIBLE",  # MKL: one code path on Intel and AMD alike (AVX2 is honoured on Intel only)
}
_TRUE, _FALSE = ("1", "true", "on", "yes"), ("", "0", "false", "off", "no")


def requested(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether ``ASTRAORA_REPRODUCIBLE`` asks for the pinned path (1/true/on/yes; unset, 0/false/off/no:
    not). Any other value is refused in one line, naming the variable and the values it takes."""
    value = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(
        f"{ENV}={value!r} is not allowed; choose one of 1, true, on, yes (pin the CPU kernels) "
        "or 0, false, off, no (the fastest kernels for this CPU)."
    )


def apply(environ: MutableMapping[str, str] | None = None, strict: bool = False) -> dict[str, str]:
    """Where :func:`requested`, put SETTINGS into ``environ`` (default: this process's environment),
    each one the user has not set already; the variables it set.

    It must run before torch is imported (astraora/__init__.py calls it, so any entry point that imports
    astraora before torch is in time). Where torch came first, ATen's choice is already made: it sets
    nothing rather than pin half of the kernels, and warns (``strict``: raises RuntimeError). Nothing
    left to set (a second call, a process started by a pinned one) is never too late."""
    environ = os.environ if environ is None else environ
    if not requested(environ):
        return {}
    added = {key: value for key, value in SETTINGS.items() if key not in environ}
    if added and environ is os.environ and "torch" in sys.modules:
        message = (
            f"{ENV}=1 came after torch was imported (ATEN_CPU_CAPABILITY is read at import): import astraora "
            "before torch, or set " + " ".join(f"{k}={v}" for k, v in added.items()) + " in the environment"
        )
        if strict:
            raise RuntimeError(message)
        warnings.warn(message + "; this process runs the CPU's fastest kernels", RuntimeWarning, stacklevel=2)
        return {}
    environ.update(added)
    return added


def describe() -> str:
    """The CPU kernels this process runs, for a run's log and summary: ATen's instruction set, MKL's
    reproducibility mode and oneDNN's limit, e.g. ``ATen AVX2, MKL_CBWR=COMPATIBLE, oneDNN ≤ AVX2``."""
    import torch

    return (
        f"ATen {torch.backends.cpu.get_cpu_capability()}, MKL_CBWR={os.environ.get('MKL_CBWR', 'AUTO')}, "
        f"oneDNN ≤ {os.environ.get('ONEDNN_MAX_CPU_ISA', 'ALL')}"
    )
