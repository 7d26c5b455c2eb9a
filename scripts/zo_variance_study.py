"""What M random directions would cost at accuracy, without paying M's queries.

    python scripts/zo_variance_study.py M -m experiment=study_parity_image_folder,study_parity_synthetic_audio \\
        device=mzi seed=0,1,2,3,4                   # one multirun per M (0: the true gradient)
    python scripts/zo_variance_study.py --report outputs/zo_variance

Each run is ``python train.py mode=exact OVERRIDES`` (the parity study's task settings) with every
physical layer's θ-gradient replaced by a draw from the Gaussian ZO estimator's exact distribution
at M directions (:func:`astraora.zo.variance.gaussian_estimate_draw`; linear regime), written to
outputs/zo_variance/M<M>/<overrides>. The jobs run one after another in this process (the default
launcher), which holds the replacement. The report: mean test metric ± s.e. over seeds per
(task, device, M), accuracy in %.
"""

import statistics
import sys
from pathlib import Path

from _study import train_wrapped

from astraora.report.compare import COMPLETED, find_run_dirs, load_run


def report(root: Path) -> str:
    rows = {}
    for run in (load_run(path) for path in find_run_dirs([root])):
        metric = next((m for m in ("test/acc", "test/loss") if run.summary_metric(m) is not None), None)
        m = next((int(p[1:]) for p in run.path.relative_to(root).parts if p[:1] == "M" and p[1:].isdigit()), None)
        if run.status == COMPLETED and metric and m is not None:
            scale = 100 if metric == "test/acc" else 1
            rows.setdefault((run.task, run.device, metric), {}).setdefault(m, []).append(
                scale * run.summary_metric(metric)
            )
    lines = ["| task | device | metric | M (0: true gradient) | mean ± s.e. | seeds |", "|---|---|---|---|---|---|"]
    for (task, device, metric), by_m in sorted(rows.items()):
        for m, v in sorted(by_m.items(), key=lambda item: (item[0] == 0, item[0])):
            se = statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else float("nan")
            lines.append(
                f"| {task} | {device} | {metric} | {m or 'true'} | {statistics.fmean(v):.2f} ± {se:.2f} | {len(v)} |"
            )
    return "\n".join(lines)


def with_draws(samples: int):
    """Wrap :func:`astraora.train.run`: θ's gradient replaced by M-direction draws (M = 0: unchanged),
    from a generator seeded per run."""
    import torch

    from astraora.hybrid import HybridLayer
    from astraora.zo.variance import gaussian_estimate_draw

    state, true_grad = {}, HybridLayer.theta_grad

    def noisy_grad(self, x, g, y):
        grad = true_grad(self, x, g, y)
        return grad if samples == 0 or grad is None else gaussian_estimate_draw(grad, samples, state["generator"])

    def wrap(true_run):
        def run(cfg, callbacks=()):
            state["generator"] = torch.Generator().manual_seed(1_000_003 * int(cfg.seed) + 17)
            HybridLayer.theta_grad = noisy_grad
            return true_run(cfg, callbacks)

        return run

    return wrap


if __name__ == "__main__":
    if sys.argv[1:2] == ["--report"]:
        table = report(Path(sys.argv[2]))
        (Path(sys.argv[2]) / "zo_variance.md").write_text(table + "\n", encoding="utf-8")
        print(table)
    elif sys.argv[1:2] and sys.argv[1].isdigit():
        samples = int(sys.argv[1])
        train_wrapped(with_draws(samples), f"outputs/zo_variance/M{samples}", ["mode=exact", *sys.argv[2:]])
    else:
        sys.exit(__doc__)
