#!/usr/bin/env bash
# The native tile kernels (astraora/devices/tile_blocks.c) under AddressSanitizer and
# UndefinedBehaviorSanitizer, then the device tests without the kernels (ASTRAORA_NATIVE=0).
#
# (a) ASTRAORA_NATIVE_SANITIZE=1 makes devices/native.py build the kernels with
#     -fsanitize=address,undefined -fno-sanitize-recover=all (a cached file of its own; a failed build
#     raises instead of falling back to PyTorch), so any out-of-bounds access or undefined operation
#     stops the test run. The ASan runtime must be the first library of the process: a ctypes-loaded
#     library gets it through LD_PRELOAD. Leak detection is off (Python's allocations are not ours).
# (b) the same tests and the device tests on the PyTorch path alone.
# Usage: bash scripts/check_native.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
compiler="${CC:-cc}"
libasan="$("$compiler" -print-file-name=libasan.so)"
if [[ ! -e "$libasan" ]]; then
    echo "check_native: $compiler has no AddressSanitizer runtime (libasan.so); install it (gcc: libasan)" >&2
    exit 1
fi
kernel_tests=(tests/test_mesh_tiles.py tests/test_native.py tests/test_fidelity.py)

echo "== native kernels built with AddressSanitizer + UndefinedBehaviorSanitizer"
export ASTRAORA_NATIVE_SANITIZE=1 ASTRAORA_NATIVE=1
export LD_PRELOAD="$libasan" ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1
python -c "from astraora.devices import native
path = native.library().path
assert path.name.startswith('tile_blocks-sanitize-'), path
print('check_native: loaded', path)"
# --capture=sys: a sanitizer's report (written to fd 2 as the process stops) reaches the terminal
python -m pytest -q -p no:cacheprovider --capture=sys "${kernel_tests[@]}" "$@"
unset ASTRAORA_NATIVE_SANITIZE LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS

echo "== without native kernels (ASTRAORA_NATIVE=0)"
ASTRAORA_NATIVE=0 python -m pytest -q -p no:cacheprovider "${kernel_tests[@]}" tests/test_devices.py "$@"
