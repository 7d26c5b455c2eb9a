"""G's spectrum along real training runs, and what the sketched batch's truncation costs.

    python scripts/batch_spectrum.py -m experiment=study_parity_image_folder device=mzi,slm seed=0
    python scripts/batch_spectrum.py --report outputs/batch_spectrum

Each run is ``python train.py OVERRIDES`` unchanged, with every physical layer's θ-gradient call
observed: on every 5th call, the singular values of G = Σ_b g_b x_bᵀ (the ZO estimator's target
⟨A(θ), G⟩) and, for each rank r below rank G, the cosine between the exact VJPs ∇_θ⟨A, G_r⟩ (what
``zo.batch_rank=r`` estimates) and ∇_θ⟨A, G⟩ (autograd through the simulator; no query counted). The
records go to spectrum.jsonl in the run folder. The report (batch_spectrum.md): per task, device and
layer, the median over the recorded steps of rank G, the ranks holding 90 / 99 / 99.9 % of ‖G‖_F² and
the cosine per r; batch_spectrum.png: the mean normalised spectrum σ_j / σ_1.
"""

import json
import statistics
import sys
from pathlib import Path

from _study import train_wrapped

EVERY = 5  # observe every 5th θ-gradient call of each layer
RANKS = (1, 2, 4, 8, 16, 32)
ENERGIES = (0.9, 0.99, 0.999)


def observe(layer, x, g) -> dict:
    """One record: G's normalised singular values, its energy ranks and the truncation cosines."""
    import torch

    from astraora.zo.estimator import zo_sketch

    x, g = x.detach().double(), g.detach().double()
    probes, weights = zo_sketch(x, g)
    s = weights.norm(dim=1) * probes.norm(dim=1)  # σ_j (the scale cancels)
    energy = torch.cumsum(s**2, 0) / (s**2).sum()
    exact = layer.exact_theta_grad(x.to(layer.device.theta.dtype), g.to(layer.device.theta.dtype)).double().flatten()
    cosines = {}
    for r in (r for r in RANKS if r < len(s)):
        p, w = (t[:r].to(layer.device.theta.dtype) for t in (probes, weights))
        sketched = layer.exact_theta_grad(p, w).double().flatten()
        cosines[r] = float(torch.nn.functional.cosine_similarity(sketched, exact, dim=0))
    return {
        "batch": x.shape[0],
        "d_in": x.shape[1],
        "d_out": g.shape[1],
        "rank": len(s),
        "energy_rank": {str(e): int((energy < e - 1e-12).sum()) + 1 for e in ENERGIES},
        "sigma": [float(v) for v in (s / s[0])[:64]],
        "cosine": cosines,
    }


def with_observer(wrap_records: list):
    from astraora.hybrid import HybridLayer

    true_grad = HybridLayer.theta_grad

    def observed(self, x, g, y):
        calls = self.__dict__.setdefault("_spectrum_calls", 0)
        self._spectrum_calls = calls + 1
        if calls % EVERY == 0 and g.abs().sum() > 0:
            wrap_records.append({"layer": self.name, "call": calls, **observe(self, x, g)})
        return true_grad(self, x, g, y)

    def wrap(true_run):
        def run(cfg, callbacks=()):
            wrap_records.clear()
            HybridLayer.theta_grad = observed
            try:
                summary = true_run(cfg, callbacks)
            finally:
                HybridLayer.theta_grad = true_grad
            with open(Path(summary["run_dir"]) / "spectrum.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in wrap_records)
            return summary

        return run

    return wrap


def plot(groups: dict) -> "Figure":  # noqa: F821
    """Mean normalised singular values σ_j / σ_1 of G per task and device (log scale), one line each."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    for (task, device, _layer), recs in sorted(groups.items()):
        length = min(len(r["sigma"]) for r in recs)
        mean = [statistics.fmean(r["sigma"][j] for r in recs) for j in range(length)]
        axes.plot(range(1, length + 1), mean, label=f"{task} / {device}", marker=".", markersize=3)
    axes.set(yscale="log", xscale="log", xlabel="j", ylabel="σ_j / σ_1 (mean over steps)", title="G = Σ_b g_b x_bᵀ")
    axes.legend(fontsize="x-small")
    axes.grid(alpha=0.3)
    return figure


def collect(root: Path) -> dict:
    groups = {}
    for path in sorted(root.rglob("spectrum.jsonl")):
        summary = json.loads((path.parent / "summary.json").read_text(encoding="utf-8"))
        task, device = summary.get("task", "?"), summary.get("device", "?")
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            groups.setdefault((task, device, rec["layer"]), []).append(rec)
    return groups


def report(groups: dict) -> str:
    head = "| task | device | layer | B | n → m | rank G | r(90 %) | r(99 %) | r(99.9 %) | " + " | ".join(
        f"cos r={r}" for r in RANKS
    )
    lines = [head + " | steps |", "|" + "---|" * (10 + len(RANKS))]
    for (task, device, layer), recs in sorted(groups.items()):
        med = lambda values: statistics.median(values) if values else float("nan")  # noqa: E731
        first = recs[0]
        cos = [med([r["cosine"][str(k)] for r in recs if str(k) in r["cosine"]]) for k in RANKS]
        lines.append(
            f"| {task} | {device} | {layer} | {first['batch']} | {first['d_in']} → {first['d_out']} | "
            f"{med([r['rank'] for r in recs]):g} | "
            + " | ".join(f"{med([r['energy_rank'][str(e)] for r in recs]):g}" for e in ENERGIES)
            + " | "
            + " | ".join("–" if c != c else f"{c:.3f}" for c in cos)
            + f" | {len(recs)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--report"]:
        root = Path(sys.argv[2])
        groups = collect(root)
        table = report(groups)
        (root / "batch_spectrum.md").write_text(table + "\n", encoding="utf-8")
        plot(groups).savefig(root / "batch_spectrum.png", dpi=120)
        print(table)
    elif sys.argv[1:]:
        train_wrapped(with_observer([]), "outputs/batch_spectrum", sys.argv[1:])
    else:
        sys.exit(__doc__)
