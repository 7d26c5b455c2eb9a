#!/usr/bin/env bash
# astraora as a user installs it: the wheel (`pip wheel .`) in a fresh virtual environment that cannot
# see this source tree, its commands run from another folder:
#   1. `astraora-train` trains 3 steps with the configs the wheel carries (astraora/conf);
#   2. a lab's own device (a Device subclass and conf/device/<name>.yaml in a folder outside the
#      repository, on PYTHONPATH and on Hydra's search path) trains, and a misspelt name is refused in
#      one line that lists it;
#   3. `astraora-device-server` serves that device the same way, and a run trains on it (device=remote).
# The environment reuses the installed torch & co. (--system-site-packages); the wheel goes in with
# --no-deps. Called by .ci/run after the tests; about a minute on 2 cores.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
work="$(mktemp -d)"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
passed=0
ok() { passed=$((passed + 1)); echo "check_wheel: ok ($((SECONDS - start)) s): $*"; }
die() { echo "check_wheel: FAILED: $*" >&2; exit 1; }
start=$SECONDS

# The wheel, built from a copy of what it is made of, so that nothing left in build/ or egg-info here
# (a module since removed, a stale config) can slip into it.
mkdir "$work/src" "$work/wheel" "$work/run" "$work/lab"
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/astraora" "$repo/conf" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
"$python" -m pip wheel "$work/src" --no-deps --quiet -w "$work/wheel"
wheel=$(ls "$work"/wheel/astraora-*.whl)
"$python" -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install --no-deps --quiet "$wheel"
bin="$work/venv/bin"
ok "built and installed $(basename "$wheel")"

# From a folder outside the repository, with nothing of the source tree importable.
cd "$work/run"
export WANDB_MODE=offline
unset PYTHONPATH
"$bin/python" - "$work/venv" <<'EOF'
import sys
from pathlib import Path

import astraora
from astraora import cli
from astraora.remote import server

venv, package = Path(sys.argv[1]).resolve(), Path(astraora.__file__).resolve().parent
assert package.is_relative_to(venv) and package.parent.name == "site-packages", f"astraora imported from {package}"
assert Path(cli.CONFIG_DIR) == package / "conf" == Path(server.CONFIG_DIR), cli.CONFIG_DIR
assert (package / "conf" / "device" / "mzi.yaml").is_file() and (package / "conf" / "server.yaml").is_file()
EOF
ok "astraora and its configs are imported from the environment's site-packages"

FAST=(debug=fast trainer.max_steps=3 trainer.limit_val_batches=1 trainer.limit_test_batches=1)
"$bin/astraora-train" "${FAST[@]}" > train.out 2>&1 || { cat train.out; die "astraora-train from the wheel"; }
grep -q "digits / mzi (zo+sm): test/acc" train.out || { cat train.out; die "astraora-train printed no result"; }
ls outputs/runs/*/summary.json > /dev/null
ok "astraora-train trained 3 steps from the wheel in $(pwd)"

# A lab's device in the lab's own folder: mylab/devices.py and mylab/conf/device/attenuator.yaml.
mkdir -p "$work/lab/mylab/conf/device"
touch "$work/lab/mylab/__init__.py"
cat > "$work/lab/mylab/devices.py" <<'EOF'
import torch

from astraora.devices import Device, dense_transfer


class AttenuatorBank(Device):
    """A = sigmoid(theta): a bank of variable optical attenuators."""

    is_phase_device = False

    def theta_shape(self):
        return (self.d_out, self.d_in)

    def init_theta(self, generator):
        return torch.randn(self.theta_shape(), generator=generator)

    def transfer(self, theta, x):
        return dense_transfer(torch.sigmoid(theta), x)
EOF
cat > "$work/lab/mylab/conf/device/attenuator.yaml" <<'EOF'
family: attenuator
_target_: mylab.devices.AttenuatorBank
nonideal: {output_noise: 0.0, phase_bits: 0, input_bits: 0, drift_std: 0.0, crosstalk: 0.0}
faults: {raise_prob: 0.0, nonfinite_prob: 0.0, slow_prob: 0.0, slow_seconds: 0.0}
driver: {max_retries: 3, timeout_s: null}
EOF
export PYTHONPATH="$work/lab"
searchpath="hydra.searchpath=[file://$work/lab/mylab/conf]"
"$bin/astraora-train" "${FAST[@]}" "$searchpath" device=attenuator > lab.out 2>&1 \
    || { cat lab.out; die "the lab's device"; }
grep -q "digits / attenuator (zo+sm): test/acc" lab.out || { cat lab.out; die "the lab's device printed no result"; }
set +e
"$bin/astraora-train" "$searchpath" device=attenuatr > refused.out 2>&1
code=$?
set -e
[ "$code" = 2 ] && [ "$(wc -l < refused.out)" = 1 ] \
    && grep -q "device=attenuatr is not allowed; choose one of \['attenuator'," refused.out \
    || { cat refused.out; die "a misspelt device of the lab's folder: exit $code"; }
ok "the lab's device trained through hydra.searchpath; a misspelt one was refused in one line"

port=$("$bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
ASTRAORA_DEVICE_TOKEN=check-wheel-token "$bin/astraora-device-server" "$searchpath" device=attenuator \
    "server.address=tcp://127.0.0.1:$port" > server.out 2>&1 &
server_pid=$!
for _ in $(seq 1 60); do
    grep -q "serving" server.out && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.5
done
grep -q "serving simulator attenuator (mylab.devices.AttenuatorBank) on tcp://127.0.0.1:$port" server.out \
    || { cat server.out; die "astraora-device-server did not serve the lab's device"; }
ASTRAORA_DEVICE_TOKEN=check-wheel-token "$bin/astraora-train" "${FAST[@]}" device=remote \
    "device.address=tcp://127.0.0.1:$port" > remote.out 2>&1 \
    || { cat remote.out server.out; die "training on the served device"; }
grep -q "digits / remote (zo+sm): test/acc" remote.out \
    || { cat remote.out; die "training on the served device printed no result"; }
kill "$server_pid"
wait "$server_pid" 2>/dev/null || true
server_pid=""
ok "astraora-device-server served the lab's device through hydra.searchpath; astraora-train trained on it"

echo "check_wheel: done in $((SECONDS - start)) s"
echo "check_wheel: $passed passed, 0 failed"
