"""Data-parallel training: seed-synchronised ZO, rank-0 surrogate, sharded data, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from astraora.data.common import ResumableSampler
from astraora.devices.dense import MatVec
from astraora.ledger import QueryLedger
from astraora.rng import make_generator
from astraora.zo import ZOEstimator
from tests.conftest import REPO, RESUMABLE, TINY_MODEL, compose_config, run_cli


def _estimate_on_shards(x, g, shards: int, samples: int = 12, chunk=5):
    """ĝ of each of ``shards`` 'processes' (threads), each with its own device copy and an
    estimator whose reducer averages the coefficients over the threads; returns the ĝ's and the
    floats each reducer call moved."""
    barrier, box, moved, out = threading.Barrier(shards), [None] * shards, [], [None] * shards
    torch.manual_seed(0)
    theta0 = torch.randn(6, 5)

    def worker(rank):
        device = MatVec(5, 6)
        with torch.no_grad():
            device.theta.copy_(theta0)
        zo = ZOEstimator(samples, 1e-3, chunk_size=chunk, generator=make_generator(0, "layer", "zo"))

        def mean(t):
            box[rank] = t.clone()
            barrier.wait()
            total = sum(box) / shards
            moved.append(t.numel())
            barrier.wait()
            return total

        zo.reducer = mean if shards > 1 else None
        part = slice(rank * len(x) // shards, (rank + 1) * len(x) // shards)
        # each process's upstream gradient is that of its shard's mean loss: W times the global one
        out[rank] = zo.estimate(QueryLedger(device), x[part], g[part] * shards)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(shards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, moved


def test_seed_synchronised_zo_matches_one_process_with_m_floats():
    # in float64: the finite differences of a half batch and of the whole one then agree closely
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        gen = torch.Generator().manual_seed(1)
        x, g = torch.randn(8, 5, generator=gen), torch.randn(8, 6, generator=gen) / 8
        (single,), _ = _estimate_on_shards(x, g, 1)
        (a, b), moved = _estimate_on_shards(x, g, 2)
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(a, b)  # every process ends with the same ĝ
    torch.testing.assert_close(a, single, rtol=1e-7, atol=1e-9)
    assert moved == [12, 12]  # one collective of M floats per process, not p = 30


def test_sampler_shards_each_global_batch_and_resumes():
    full = list(ResumableSampler(22, seed=3))
    shards = []
    for rank in range(2):
        s = ResumableSampler(22, seed=3)
        s.shard(rank, 2, 8)
        shards.append(list(s))
        assert len(s) == len(shards[-1]) == 11  # last partial global batch (6) split 3 + 3
    for k in range(3):
        assert set(full[k * 8 : (k + 1) * 8]) == set(shards[0][k * 4 : (k + 1) * 4]) | set(
            shards[1][k * 4 : (k + 1) * 4]
        )
    s = ResumableSampler(22, seed=3)
    s.shard(1, 2, 8, drop_last=True)
    s.skip(8)  # resumed after one global batch
    assert list(s) == shards[1][4:8]
    # epochs differ (text windows too: RandomWindows is redrawn through on_epoch)
    epochs = []
    s = ResumableSampler(22, seed=3, on_epoch=epochs.append)
    s.shard(0, 2, 8)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first and epochs == [1]


class _ThreadSync:
    """RankSync's ``sum`` for ``world`` threads standing in for processes."""

    def __init__(self, rank, world, box, barrier):
        self.rank, self.world_size, self.box, self.barrier = rank, world, box, barrier

    def sum(self, t, purpose="health"):
        self.box[self.rank] = t.clone()
        self.barrier.wait()
        total = sum(self.box)
        self.barrier.wait()
        return total

    def mean(self, t):
        return self.sum(t, "zo") / self.world_size

    def broadcast(self, t, purpose="surrogate"):
        self.box[self.rank] = t.clone()
        self.barrier.wait()
        first = self.box[0].clone()
        self.barrier.wait()
        return first


@pytest.mark.parametrize("rows", [(100, 100), (100, 2)])
def test_health_growth_decides_alike_in_every_process(rows):
    """Each process checks its shard; the sums behind the ratio (the shards' errors and best rank-r
    errors on their inputs) are the same on every process, so every process reads out at the same
    steps. Where one shard is too short to tell (2 rows, rank 3), every process falls back to the
    plain residual."""
    from test_surrogate_health import falling_best_error_layer, falling_best_error_walk

    layers = [falling_best_error_layer(), falling_best_error_layer()]
    box, barrier = [None, None], threading.Barrier(2)
    for rank, layer in enumerate(layers):
        layer.sync = _ThreadSync(rank, 2, box, barrier)
    fires = [None, None]

    def process(rank):
        xs = torch.Generator().manual_seed(10 + rank)
        fires[rank] = list(falling_best_error_walk(layers[rank], lambda: torch.randn(rows[rank], 12, generator=xs)))

    threads = [threading.Thread(target=process, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fires[0] == fires[1] and len(fires[0]) == 15
    assert layers[0].health.reference_residual == layers[1].health.reference_residual
    assert layers[0].health.reference_kind == layers[1].health.reference_kind == ("view" if min(rows) > 3 else "plain")
    assert any(fires[0]) is (min(rows) > 3)  # the plain residual stays level here


def test_colored_differences_are_measured_once_for_all_processes():
    """zo=colored reads the whole matrix out at every color's setting, whatever the batch: under data
    parallelism rank 0 measures once for the whole batch (the shards' Gᵀ X averaged) and the others
    receive its estimate, so the ZO queries per step are one process's (not one set per process) and
    every process gets the whole batch's ĝ."""
    from astraora.devices import SLM
    from astraora.hybrid import HybridLayer
    from astraora.zo import ColoredEstimator

    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(8, 6, generator=gen), torch.randn(8, 4, generator=gen) / 8

    def layer():
        return HybridLayer(SLM(6, 4, seed=2), mode="zo+sm", rank=2, zo=ColoredEstimator(), seed=0)

    one = layer()
    single = one.theta_grad(x, g, None)
    layers, box, barrier, grads = [layer(), layer()], [None, None], threading.Barrier(2), [None, None]
    for rank, lay in enumerate(layers):
        lay.sync = _ThreadSync(rank, 2, box, barrier)
        lay.zo.reducer = lay.sync.mean

    def process(rank):  # each process's upstream gradient is that of its shard's mean loss
        grads[rank] = layers[rank].theta_grad(x[4 * rank : 4 * rank + 4], 2 * g[4 * rank : 4 * rank + 4], None)

    threads = [threading.Thread(target=process, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(grads[0], grads[1])
    torch.testing.assert_close(grads[0], single, rtol=1e-5, atol=1e-6)
    counts = [lay.ledger.queries["zo"] for lay in layers]
    assert counts == [one.ledger.queries["zo"], 0] and counts[0] == 2 * 6  # (k + 1)·n: no readout to reuse yet


def test_digital_buffers_are_averaged_over_processes(make_cfg, monkeypatch):
    """Under DDP every process ends each step with the same BatchNorm statistics (their mean: the
    running mean one process keeps over the whole global batch); the physical layers' buffers
    and integer counters are left alone. DDP itself does not keep them equal under manual
    optimisation, so without this a resume (rank 0's statistics everywhere) changed rank 1's."""
    from astraora import parallel
    from astraora.build import build_model
    from astraora.lit.module import ClassificationModule

    cfg = make_cfg("task.model.hidden=8", "surrogate.rank=2")
    spec = dict(
        optimizer={"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
        physical_optimizer={"name": "adam", "lr": 1e-2, "weight_decay": 0.0},
        scheduler={"name": "constant", "warmup_steps": 0},
    )
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    one, *ranks = (
        ClassificationModule(build_model(cfg, {"num_classes": 10, "in_features": 64}), num_classes=10, **spec)
        for _ in range(3)
    )
    with torch.no_grad():
        for module in ranks:
            module.load_state_dict(one.state_dict())
        one.model.stem(x)  # one process, the whole batch
    for rank, module in enumerate(ranks):
        with torch.no_grad():
            module.model.stem(x[rank * 8 : (rank + 1) * 8])  # each process, its half
        module.model.head.physical.device.drift.fill_(float(rank))  # a physical layer's own buffer
    bn = "stem.2.running_mean"
    assert not torch.equal(dict(ranks[0].model.named_buffers())[bn], dict(ranks[1].model.named_buffers())[bn])

    monkeypatch.setattr(parallel, "world_size", lambda: 2)
    box, barrier = [None, None], threading.Barrier(2)
    for rank, module in enumerate(ranks):
        module._sync = _ThreadSync(rank, 2, box, barrier)
    threads = [threading.Thread(target=m.average_buffers) for m in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    a, b = (dict(m.model.named_buffers()) for m in ranks)
    shared = {name for name, _ in ranks[0].model.named_buffers() if not name.startswith("head.physical.")}
    assert shared >= {bn, "stem.2.running_var", "stem.2.num_batches_tracked"}
    for name in shared:
        assert torch.equal(a[name], b[name]), name
    torch.testing.assert_close(a[bn], dict(one.model.named_buffers())[bn])
    assert int(a["stem.2.num_batches_tracked"]) == 1
    assert float(a["head.physical.device.drift"].abs().max()) == 0.0
    assert float(b["head.physical.device.drift"].min()) == 1.0


def test_ddp_configs_compose():
    cfg = compose_config(["trainer=ddp_cpu"])
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.use_distributed_sampler) == ("ddp", 2, False)
    cfg = compose_config(
        [
            "trainer=ddp",
            "launcher=slurm",
            "hydra.launcher.nodes=2",
            "hydra.launcher.tasks_per_node=4",
            "trainer.num_nodes=2",
            "trainer.devices=4",
        ]
    )
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu" and cfg.trainer.num_nodes == 2


@pytest.mark.slow
def test_odd_global_batch_is_refused(tmp_path):
    res = run_cli(["trainer=ddp_cpu", "task.datamodule.batch_size=63", f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path)
    assert res.returncode == 2
    assert "task.datamodule.batch_size=63" in res.stderr + res.stdout


TINY = [
    "task.max_epochs=8",
    "zo.samples=8",
    "integrator.samples=8",
    "surrogate.rank=4",
    "trainer.deterministic=true",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=5",
]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """`python train.py trainer=ddp_cpu` (2 gloo processes) against one process, same global batch."""
    runs = {}
    for name, trainer in (("ddp", "trainer=ddp_cpu"), ("one", "trainer=cpu")):
        res = run_cli([trainer, *TINY, f"hydra.run.dir={tmp_path}/{name}"], cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    ddp, one = runs["ddp"], runs["one"]
    assert ddp["queries"] == one["queries"]  # per-process batch 32 <= m = 64: no compressed batch
    assert ddp["steps"] == one["steps"]
    dist = ddp["distributed"]
    assert dist["world_size"] == 2 and dist["max_rank_divergence"] == 0.0  # θ, U, S, V identical on both
    assert dist["zo_floats_per_step"] == 8 and not dist["theta_in_ddp_allreduce"]
    assert dist["ddp_gradient_floats_per_step"] > 0 and dist["theta_floats"] == 64 * 63
    # within 1 pt (BatchNorm uses each process's half batch on the CPU: no SyncBatchNorm there)
    assert abs(ddp["metrics"]["test/acc"] - one["metrics"]["test/acc"]) < 0.01
    assert "distributed" not in one
    assert (tmp_path / "ddp" / "metrics.csv").exists()


RESUME = ["trainer=ddp_cpu", *RESUMABLE, *TINY_MODEL]


def _train(args, cwd, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **kwargs,
    )


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """The uninterrupted 2-process RESUME run."""
    ref_dir = tmp_path_factory.mktemp("ddp") / "reference"
    reference = _train([*RESUME, f"hydra.run.dir={ref_dir}"], ref_dir.parent)
    assert reference.wait(timeout=300) == 0
    return ref_dir


@pytest.mark.slow
def test_sigkill_of_both_processes_then_resume_equals_uninterrupted(tmp_path, ddp_reference):
    """~45 s: against the uninterrupted 2-process run, one whose process group is SIGKILLed after a
    step checkpoint, and its resume: same metrics.csv, summary metrics and query totals."""
    ref_dir, run_dir = ddp_reference, tmp_path / "killed"
    proc = _train([*RESUME, f"hydra.run.dir={run_dir}"], tmp_path)
    deadline = time.time() + 240
    while not list((run_dir / "checkpoints").glob("step6.ckpt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher (rank 0) and its child (rank 1)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = _train([*RESUME, f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'new'}"], tmp_path)
    assert resumed.wait(timeout=300) == 0
    ref, got = (json.loads((d / "summary.json").read_text()) for d in (ref_dir, run_dir))
    assert (got["queries"], got["reprograms"], got["steps"]) == (ref["queries"], ref["reprograms"], ref["steps"])
    assert got["metrics"] == ref["metrics"]
    assert (run_dir / "metrics.csv").read_text() == (ref_dir / "metrics.csv").read_text()


# train.py with one process failing in the middle of one step, at its first ZO query: ``what`` is
# kill (SIGKILL), device (a DeviceFault at every try: a DeviceFailure) or error (a bug: ValueError).
# Each process writes <record>/rank<r>.json: when it failed, and its exit code.
FAULT_SCRIPT = """
import json, os, signal, sys, time
from pathlib import Path

import lightning as L

from astraora import train
from astraora.errors import DeviceFault

rank, step, what = os.environ["ASTRAORA_TEST_FAULT"].split(":")
record = Path(os.environ["ASTRAORA_TEST_RECORD"])


def note(**entry):
    path = record / f"rank{os.environ.get('LOCAL_RANK', '0')}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**old, **entry}))


class Fault(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank != int(rank) or trainer.global_step != int(step):
            return
        device = pl_module.model.head.physical.device
        query = device.query

        def failing(x, theta=None, *, purpose="forward"):
            if purpose != "zo":
                return query(x, theta, purpose=purpose)
            note(failed_at=time.time())
            if what == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if what == "error":
                raise ValueError("injected: a bug in one process")
            raise DeviceFault("injected: the chip stopped answering")

        device.query = failing


make_callbacks = train.make_callbacks
train.make_callbacks = lambda cfg, out: [*make_callbacks(cfg, out), Fault()]
code = 1
try:
    from astraora.cli import main

    main()
    code = 0
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else 1
    raise
finally:
    note(exit_code=code, exited_at=time.time())
"""


def _train_failing(args, tmp_path, rank: int, step: int, what: str):
    """A 2-process run (rank 0 the returned process, rank 1 its child) in which process ``rank``
    fails at ``step``; its stderr (both processes') is piped."""
    script, record = tmp_path / "fault.py", tmp_path / "record"
    script.write_text(FAULT_SCRIPT)
    record.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "offline",
        "ASTRAORA_TEST_FAULT": f"{rank}:{step}:{what}",
        "ASTRAORA_TEST_RECORD": str(record),
    }
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = proc.communicate(timeout=240)  # until both processes closed the pipe
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    records = {int(p.stem[4:]): json.loads(p.read_text()) for p in record.glob("rank*.json")}
    return proc, stderr, records


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
@pytest.mark.parametrize("what", ["kill", "error"])
def test_lost_process_stops_rank_0_with_one_line_and_summary(tmp_path, what):
    """~20 s each: process 1 is SIGKILLed (or raises a plain error) in the middle of step 5. Rank 0 stops
    within seconds (not at the process-group timeout, not SIGKILLed by Lightning's launcher) with
    exit code 3 and one line naming process 1, no traceback, and writes summary.json."""
    run_dir = tmp_path / "run"
    proc, stderr, records = _train_failing([*RESUME, f"hydra.run.dir={run_dir}"], tmp_path, rank=1, step=5, what=what)
    assert proc.returncode == 3, stderr[-3000:]
    assert records[0]["exit_code"] == 3 and records[0]["exited_at"] - records[1]["failed_at"] < 10
    lines = _error_lines(stderr)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "peer_failure" and summary["steps"] == 5 and summary["queries"]["total"] > 0
    if what == "kill":
        assert lines == [
            f"error: data-parallel process 1 stopped (killed or crashed); this process stops too. "
            f"resume={run_dir} continues exactly from the checkpoint at step 4."
        ], stderr[-3000:]
        assert "Traceback" not in stderr and "frame #" not in stderr
    else:  # process 1's own error is shown as Python shows it (a bug); rank 0 says one line
        assert len(lines) == 1 and "data-parallel process 1 stopped (ValueError: injected: a bug" in lines[0]
        assert stderr.count("Traceback") == 1


@pytest.mark.slow
def test_killed_rank_0_stops_process_1_without_a_cpp_trace(tmp_path):
    """~20 s: rank 0 (which hosts the process group's store) is SIGKILLed in the middle of step 5:
    process 1 exits within seconds with code 3 and one line, and prints no C++ trace (it does not
    touch the store, whose server died with rank 0)."""
    run_dir = tmp_path / "run"
    proc, stderr, records = _train_failing([*RESUME, f"hydra.run.dir={run_dir}"], tmp_path, rank=0, step=5, what="kill")
    assert proc.returncode == -signal.SIGKILL
    assert records[1]["exit_code"] == 3 and records[1]["exited_at"] - records[0]["failed_at"] < 10
    assert _error_lines(stderr) == [
        f"error: data-parallel process 0 stopped (killed, crashed or failed: see its output); "
        f"this process stops too. resume={run_dir} continues exactly from the checkpoint "
        f"at step 4."
    ], stderr[-3000:]
    assert "frame #" not in stderr and "TCPStore" not in stderr and "Traceback" not in stderr
    assert not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_device_failure_in_one_process_stops_both_then_resume_equals_uninterrupted(tmp_path, ddp_reference):
    """~40 s: a DeviceFailure in process 1 in the middle of step 7 (last checkpoint: step 6): both
    processes stop with exit code 3 (none hangs in a collective until the process-group timeout),
    rank 0 names it in one line and writes summary.json (device_failure); no checkpoint of the
    half-done step is written, and the resume from step 6 ends equal to the uninterrupted run."""
    run_dir = tmp_path / "run"
    started = time.time()
    proc, stderr, records = _train_failing(
        [*RESUME, f"hydra.run.dir={run_dir}"], tmp_path, rank=1, step=7, what="device"
    )
    assert proc.returncode == 3 and records[1]["exit_code"] == 3 and time.time() - started < 150, stderr[-3000:]
    lines = _error_lines(stderr)
    assert any(line.startswith("error: data-parallel process 1 stopped (device 'head.physical'") for line in lines), (
        lines
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "device_failure" and summary["steps"] == 7
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    resumed = _train([*RESUME, f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'new'}"], tmp_path)
    assert resumed.wait(timeout=300) == 0
    ref, got = (json.loads((d / "summary.json").read_text()) for d in (ddp_reference, run_dir))
    assert (got["queries"], got["reprograms"], got["steps"]) == (ref["queries"], ref["reprograms"], ref["steps"])
    assert got["metrics"] == ref["metrics"] and got["status"] == "completed"
    assert (run_dir / "metrics.csv").read_text() == (ddp_reference / "metrics.csv").read_text()
