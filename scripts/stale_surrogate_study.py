"""The paper authors' training loop against astraora's, for the surrogate's timing.

astraora updates the surrogate right after the optimizer step on θ (HybridLayer.after_optimizer_step),
so the backward of step t carries the input gradient through Â(θ_t), the surrogate of the θ the
forward pass used. The authors' loop differs in two ways that their code does not state:

* ``stale``: the factors U, S, V are saved for the backward before the update that follows θ's last
  change is applied, so the backward of step t uses Â(θ_{t−1}): the input gradient is G·Â(θ_{t−1}).
* ``lost``: the update after an evaluation pass is dropped: the surrogate's reference θ moves on
  without the factors following it, so one increment ΔA is missing from then on (until a full
  readout, which ``psi_implicit`` without ``rebuild_every`` never makes).

This script trains the same configs three ways, paired by seed: ``fresh`` (astraora's order),
``stale`` and ``stale+lost`` (both of the authors' quirks). The quirks are emulated around an
unchanged HybridLayer (:class:`AuthorsOrder`, a Lightning callback that wraps each physical layer's
``input_grad`` and ``after_optimizer_step``). Every variant also measures, at each backward, the
relative error ‖Â_used − A(θ_t)‖/‖A(θ_t)‖ of the surrogate the backward used against the true matrix
and the cosine of its input gradient G·Â_used to the true G·A(θ_t) (oracle diagnostics: no query).
Printed: one table of test metrics (mean over seeds), paired differences against ``fresh`` ± their
standard error, and the means over steps of that error and cosine.

    python scripts/stale_surrogate_study.py [--tasks digits synthetic_audio] [--devices mzi mrr]
        [--settings tracked full_rank] [--seeds 0 1 2] [--jobs 2] [--out outputs/stale_surrogate]
        [--set KEY=VALUE ...]

Every run is zo+sm with ``integrator=psi_implicit`` (:data:`SETTINGS`: the surrogate's two settings
and why). Runs go to OUT/runs/<setting>/<task>/<device>/<variant>/seed<S>; a run whose ``stale.json``
exists is not run again. docs/PARITY.md, "The authors' loop: a stale surrogate and a lost increment".
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

VARIANTS = ("fresh", "stale", "stale+lost")
# Every layer tracked by psi_implicit: integrator=auto reads these small layers out in full after every
# step, where a stale surrogate is one exact readout old and a lost increment is repaired at once.
COMMON = [
    "mode=zo+sm",
    "integrator=psi_implicit",
    "logger=csv",
    "callbacks=none",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
# CPU-sized settings per task: several epochs, so that evaluation passes fall inside training.
TASK_OVERRIDES: dict[str, list[str]] = {
    # 30 epochs of 19 steps, physical layer 64 → 64
    "digits": [],
    # 5 epochs of 11 steps, 192 → 32; harder than the task's default, which every mode solves to 100 %
    "synthetic_audio": [
        "task.datamodule.noise=1.5",
        "task.datamodule.num_classes=8",
        "task.datamodule.clips_per_class=64",
    ],
    # 3 epochs of 64 steps, 128 → 128 (about 80 s a run here: not in the default grid)
    "pydoc_text": ["task.max_epochs=3", "task.datamodule.samples_per_epoch=2048"],
}
# The surrogate's settings. ``tracked``: rank auto with the paper's Gaussian sketch of M_sm = 100 rows,
# where the rank-r truncation and the sketch's own error dominate the surrogate's error. ``full_rank``: full
# rank and an orthogonal sketch of M_sm = n rows (ZᵀZ/M_sm = I), where psi_implicit follows A(θ)
# exactly (a rank-r matrix path is integrated exactly by projector splitting), so the one-step lag and
# the lost increments are the surrogate's whole error: the setting where the quirks show the most.
SETTINGS: dict[str, dict[str, list[str]]] = {
    "tracked": {task: [] for task in TASK_OVERRIDES},
    "full_rank": {
        "digits": ["surrogate.rank=64", "integrator.sketch=orthogonal", "integrator.samples=64"],
        "synthetic_audio": ["surrogate.rank=32", "integrator.sketch=orthogonal", "integrator.samples=192"],
        "pydoc_text": ["surrogate.rank=128", "integrator.sketch=orthogonal", "integrator.samples=128"],
    },
}
TEST_METRICS = ("test/acc", "test/loss")


class SurrogateOrder:
    """Wraps one HybridLayer (its instance methods, the class untouched) to run the authors' order.

    ``stale``: the backward uses the factors as they were before the last update (the surrogate of
    the θ before last). ``lost``: after :meth:`evaluation_pass`, the next update is dropped: the
    reference θ moves to the new θ and the factors stay. Every variant records the relative error of
    the factors its backward used against the true matrix at the θ of that step's forward pass.
    """

    def __init__(self, layer, stale: bool, lost: bool):
        if not layer.uses_surrogate:
            raise ValueError(f"layer {layer.name!r} (mode={layer.mode}) has no surrogate to reorder")
        if layer.sync is not None:
            raise ValueError("the emulation runs one process only (no data-parallel training)")
        self.layer, self.stale, self.lost = layer, bool(stale), bool(lost)
        self.previous: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # factors before the last update
        self.drop_next = False
        self.dropped = 0
        self.errors: list[float] = []  # ‖Â_used − A(θ_t)‖ / ‖A(θ_t)‖ at each backward
        self.best_errors: list[float] = []  # the best rank-r error of A(θ_t), for reference
        self.cosines: list[float] = []  # cosine of G·Â_used to the true input gradient G·A(θ_t)
        self.moves: list[float] = []  # ‖A(θ_t) − A(θ_{t−1})‖ / ‖A(θ_t)‖: what one stale step misses
        self._last_truth: torch.Tensor | None = None
        self._input_grad, self._after_step = layer.input_grad, layer.after_optimizer_step
        layer.input_grad = self.input_grad
        layer.after_optimizer_step = self.after_optimizer_step

    def used_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """U, S, V the backward uses now (the first step, with nothing older, uses the readout)."""
        sur = self.layer.surrogate
        return self.previous if self.stale and self.previous is not None else (sur.U, sur.S, sur.V)

    @torch.no_grad()
    def input_grad(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        u, s, v = self.used_factors()
        truth = self.layer.ledger.oracle_matrix().detach().to(u.dtype)  # A at the θ of this step's forward
        norm = truth.norm().clamp_min(1e-12)
        self.errors.append(float((u @ s @ v.T - truth).norm() / norm))
        sigma = torch.linalg.svdvals(truth.double())
        self.best_errors.append(float(sigma[u.shape[1] :].norm() / sigma.norm().clamp_min(1e-300)))
        if self._last_truth is not None:
            self.moves.append(float((truth - self._last_truth).norm() / norm))
        self._last_truth = truth
        if self.stale:
            grad = ((g @ u) @ s) @ v.T
            if self.layer.capture_next_backward:
                self.layer._captured.update(x=x.detach(), g=g.detach(), grad_x=grad.detach())
        else:
            grad = self._input_grad(x, g)
        self.cosines.append(
            float(
                torch.nn.functional.cosine_similarity(
                    grad.reshape(1, -1).double(), (g @ truth).reshape(1, -1).double()
                ).item()
            )
        )
        return grad

    def evaluation_pass(self) -> None:
        if self.lost:
            self.drop_next = True

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        layer, sur = self.layer, self.layer.surrogate
        ready = bool(sur.initialized)
        if self.stale and ready:
            self.previous = (sur.U.clone(), sur.S.clone(), sur.V.clone())
        if self.drop_next and ready and not layer.integrator.reads_out(layer.theta_updates + 1):
            self.drop_next = False
            self.dropped += 1
            layer.theta_updates += 1
            layer.ledger.step_drift()
            # the increment θ_ref → θ is never applied: the factors stay, their reference moves on
            sur.set_factors(sur.U.clone(), sur.S.clone(), sur.V.clone(), layer.theta.detach())
            return
        self._after_step()


class AuthorsOrder(L.Callback):
    """Installs :class:`SurrogateOrder` on every physical layer when training starts and tells it
    of every evaluation pass run during training (not the sanity check, not the final test)."""

    def __init__(self, variant: str):
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is not allowed; choose one of {VARIANTS}")
        self.variant = variant
        self.orders: dict[str, SurrogateOrder] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        stale, lost = self.variant != "fresh", self.variant == "stale+lost"
        self.orders = {name: SurrogateOrder(layer, stale, lost) for name, layer in pl_module.physical.items()}

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            for order in self.orders.values():
                order.evaluation_pass()

    def stats(self) -> dict:
        def mean(key: str) -> float | None:
            values = [e for o in self.orders.values() for e in getattr(o, key)]
            return statistics.fmean(values) if values else None

        return {
            "variant": self.variant,
            "backwards": sum(len(o.errors) for o in self.orders.values()),
            "rel_error_mean": mean("errors"),
            "best_rank_error_mean": mean("best_errors"),
            "grad_cosine_mean": mean("cosines"),
            "step_move_mean": mean("moves"),
            "dropped": sum(o.dropped for o in self.orders.values()),
        }


def overrides(setting: str, task: str, device: str, seed: int, extra: list[str]) -> list[str]:
    """What ``python train.py`` would be given for this run (the variant is not a config key)."""
    return [
        f"task={task}",
        f"device={device}",
        f"seed={seed}",
        *COMMON,
        *TASK_OVERRIDES[task],
        *SETTINGS[setting][task],
        *extra,
    ]


def run_dir(out: Path, setting: str, task: str, device: str, variant: str, seed: int) -> Path:
    return out / "runs" / setting / task / device / variant / f"seed{seed}"


def compose(overrides_: list[str], output_dir: Path):
    """The config ``python train.py OVERRIDES`` would run, writing into ``output_dir``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from astraora.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides_))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def train_one(cfg, variant: str) -> dict:
    """Train and test ``cfg`` in ``variant``'s order; the summary's test metrics and the order's stats."""
    from astraora.train import run

    order = AuthorsOrder(variant)
    summary = run(cfg, callbacks=[order])
    if summary["status"] != "completed":
        raise RuntimeError(f"run in {cfg.paths.output_dir} ended {summary['status']}")
    metric = next(k for k in TEST_METRICS if k in summary["metrics"])
    return {
        "metric": metric,
        "value": summary["metrics"][metric],
        "test_loss": summary["metrics"].get("test/loss"),
        "steps": summary["steps"],
        **order.stats(),
    }


def job(args: tuple) -> dict:
    """One (task, device, variant, seed) run, or its stored result."""
    out, setting, task, device, variant, seed, extra = args
    directory = run_dir(Path(out), setting, task, device, variant, seed)
    done = directory / "stale.json"
    if done.exists():
        return json.loads(done.read_text())
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    started = time.time()
    result = train_one(compose(overrides(setting, task, device, seed, extra), directory), variant)
    result.update(setting=setting, task=task, device=device, seed=seed, seconds=round(time.time() - started, 1))
    done.write_text(json.dumps(result, indent=1))
    print(
        f"{setting} {task} {device} {variant} seed {seed}: {result['metric']}={result['value']:.4f} "
        f"error {result['rel_error_mean']:.4f} cosine {result['grad_cosine_mean']:.4f} "
        f"dropped {result['dropped']} ({result['seconds']} s)",
        flush=True,
    )
    return result


def paired(
    results: list[dict], variant: str, scale: float, key: str = "value", relative: bool = False
) -> tuple[float, float, int]:
    """Mean and standard error of (variant − fresh) × scale (``relative``: in % of fresh) over the
    seeds that have both."""
    by = {(r["variant"], r["seed"]): r[key] for r in results if r.get(key) is not None}
    diffs = [
        (by[(variant, s)] - by[("fresh", s)]) * (100.0 / by[("fresh", s)] if relative else scale)
        for (v, s) in by
        if v == "fresh" and (variant, s) in by
    ]
    if not diffs:
        return math.nan, math.nan, 0
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return statistics.fmean(diffs), se, len(diffs)


def table(results: list[dict]) -> str:
    """One markdown table: per task and device, the test metric per variant (accuracy in %), the paired
    differences against ``fresh`` (for classification also of the test loss, in % of fresh's: finer
    than the accuracy of a small test set), and per variant the means over the backwards of the
    surrogate's relative error and of the input gradient's cosine to the true one."""
    lines = [
        "| setting | task | device | metric | seeds | fresh | stale | stale+lost | stale − fresh "
        "| stale+lost − fresh | test loss: stale − fresh, stale+lost − fresh (%) | Â error f / s / s+l "
        "| best rank-r | grad cosine f / s / s+l | ‖ΔA‖ per step | lost per run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(SETTINGS)}
    cells = sorted({(r["setting"], r["task"], r["device"]) for r in results}, key=lambda c: (order[c[0]], c[1], c[2]))
    for setting, task, device in cells:
        rows = [r for r in results if (r["setting"], r["task"], r["device"]) == (setting, task, device)]
        acc = rows[0]["metric"] == "test/acc"
        scale, fmt, dfmt = (100.0, "{:.2f}", "{:+.2f} ± {:.2f}") if acc else (1.0, "{:.4f}", "{:+.4f} ± {:.4f}")

        def mean(key: str, variant: str | None = None, scale_: float = 1.0, rows: list[dict] = rows) -> float:
            values = [r[key] * scale_ for r in rows if variant is None or r["variant"] == variant]
            values = [v for v in values if v is not None]
            return statistics.fmean(values) if values else math.nan

        lost = [r["dropped"] for r in rows if r["variant"] == "stale+lost"]
        seeds = ",".join(map(str, sorted({r["seed"] for r in rows})))
        cells_ = [setting, task, device, "acc %" if acc else "loss", seeds]
        cells_ += [fmt.format(mean("value", v, scale)) for v in VARIANTS]
        cells_ += [dfmt.format(*paired(rows, v, scale)[:2]) for v in VARIANTS[1:]]
        cells_.append(
            ", ".join(
                "{:+.2f} ± {:.2f}".format(*paired(rows, v, 1.0, "test_loss", relative=True)[:2]) for v in VARIANTS[1:]
            )
            if acc
            else "–"
        )
        cells_ += [
            " / ".join(f"{mean('rel_error_mean', v):.4f}" for v in VARIANTS),
            f"{mean('best_rank_error_mean'):.4f}",
            " / ".join(f"{mean('grad_cosine_mean', v):.4f}" for v in VARIANTS),
            f"{mean('step_move_mean'):.4f}",
            f"{statistics.fmean(lost):.1f}" if lost else "–",
        ]
        lines.append("| " + " | ".join(cells_) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "synthetic_audio"], choices=list(TASK_OVERRIDES))
    parser.add_argument("--devices", nargs="+", default=["mzi", "mrr"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        dest="extra",
        help="extra overrides of every run (use a separate --out for them)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="trainings run at once (separate processes)")
    parser.add_argument("--out", type=Path, default=Path("outputs/stale_surrogate"))
    args = parser.parse_args(argv)
    grid = [
        (str(args.out), setting, task, device, variant, seed, list(args.extra))
        for seed in args.seeds
        for setting in args.settings
        for task in args.tasks
        for device in args.devices
        for variant in args.variants
    ]
    started = time.time()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(job, grid))
    else:
        results = [job(g) for g in grid]
    print(f"\n{len(results)} runs, {time.time() - started:.0f} s (stored runs are not run again)\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
