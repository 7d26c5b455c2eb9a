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
from tests.conftest import REPO, compose_config, run_cli


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
        assert set(full[k * 8:(k + 1) * 8]) == set(shards[0][k * 4:(k + 1) * 4]) | set(shards[1][k * 4:(k + 1) * 4])
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
    from test_reliability import falling_best_error_layer, falling_best_error_walk

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
    assert layers[0].reference_residual == layers[1].reference_residual
    assert layers[0].reference_kind == layers[1].reference_kind == ("view" if min(rows) > 3 else "plain")
    assert any(fires[0]) is (min(rows) > 3)  # the plain residual stays level here


def test_digital_buffers_are_averaged_over_processes(make_cfg, monkeypatch):
    """Under DDP every process ends each step with the same BatchNorm statistics (their mean: the
    running mean one process keeps over the whole global batch); the physical layers' buffers
    and integer counters are left alone. DDP itself does not keep them equal under manual
    optimisation, so without this a resume (rank 0's statistics everywhere) changed rank 1's."""
    from astraora.build import build_model
    from astraora.lit import module as lit_module
    from astraora.lit.module import ClassificationModule

    cfg = make_cfg("task.model.hidden=8", "surrogate.rank=2")
    spec = dict(optimizer={"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
                physical_optimizer={"name": "adam", "lr": 1e-2, "weight_decay": 0.0},
                scheduler={"name": "constant", "warmup_steps": 0})
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    one, *ranks = (ClassificationModule(build_model(cfg, {"num_classes": 10, "in_features": 64}), num_classes=10, **spec)
                   for _ in range(3))
    with torch.no_grad():
        for module in ranks:
            module.load_state_dict(one.state_dict())
        one.model.stem(x)  # one process, the whole batch
    for rank, module in enumerate(ranks):
        with torch.no_grad():
            module.model.stem(x[rank * 8:(rank + 1) * 8])  # each process, its half
        module.model.head.physical.device.drift.fill_(float(rank))  # a physical layer's own buffer
    bn = "stem.2.running_mean"
    assert not torch.equal(dict(ranks[0].model.named_buffers())[bn], dict(ranks[1].model.named_buffers())[bn])

    monkeypatch.setattr(lit_module, "world_size", lambda: 2)
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
    cfg = compose_config(["trainer=ddp", "launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=4",
                          "trainer.num_nodes=2", "trainer.devices=4"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu" and cfg.trainer.num_nodes == 2


def test_odd_global_batch_is_refused(tmp_path):
    res = run_cli(["trainer=ddp_cpu", "task.datamodule.batch_size=63", f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path)
    assert res.returncode == 2
    assert "task.datamodule.batch_size=63" in res.stderr + res.stdout


TINY = ["task.max_epochs=8", "zo.samples=8", "integrator.samples=8", "surrogate.rank=4", "trainer.deterministic=true",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.log_every_n_steps=5"]


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


RESUME = ["trainer=ddp_cpu", "trainer.max_epochs=3", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
          "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          "trainer.deterministic=true", "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_train_steps=3",
          "zo.samples=8", "integrator.samples=8", "task.model.hidden=16", "surrogate.rank=4"]


def _train(args, cwd, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)


@pytest.mark.slow
def test_sigkill_of_both_processes_then_resume_equals_uninterrupted(tmp_path):
    """~60 s: an uninterrupted 2-process run, one whose process group is SIGKILLed after a step
    checkpoint, and its resume: same metrics.csv, summary metrics and query totals."""
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    reference = _train([*RESUME, f"hydra.run.dir={ref_dir}"], tmp_path)
    assert reference.wait(timeout=300) == 0
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


@pytest.mark.slow
def test_device_failure_in_one_process_stops_both_with_exit_3(tmp_path):
    """A DeviceFailure in one process: every process stops (none hangs in the ZO all-reduce until
    the process-group timeout), last.ckpt is written and the run exits with code 3."""
    run_dir = tmp_path / "run"
    started = time.time()
    proc = _train([*RESUME, "device.faults.raise_prob=0.02", "device.driver.max_retries=0",
                   f"hydra.run.dir={run_dir}"], tmp_path)
    try:
        code = proc.wait(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 3 and time.time() - started < 150
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "device_failure" and summary["queries"]["total"] > 0
