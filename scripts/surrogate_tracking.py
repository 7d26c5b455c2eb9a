"""How far the surrogate drifts from the best rank-r approximation of the device as θ moves, per
integrator and health rule, at a given layer size, and what its upkeep costs in queries.

θ follows Adam at the family's rate on gradients that are mostly noise (N(0, I) plus a fixed 0.1·N(0, I)
direction), as θ does under ZO estimates with M ≪ p (gradient cosine ≈ √(M/p)): every control moves by
about the rate per step. Each step sends a Gaussian batch forward (the health checks' residual is
measured on it) and updates the surrogate as in training (HybridLayer.after_optimizer_step). Printed:
the surrogate's relative error against the true matrix divided by the best rank-r error (1 = the
truncated SVD of A(θ)), at a few steps and as the mean over the run, and the surrogate's queries per
step (readouts included; the forward batch is not counted).

    python scripts/surrogate_tracking.py --device mzi --d-in 512 --d-out 1024 --steps 200
    python scripts/surrogate_tracking.py --device slm --d-in 6144 --d-out 192 --steps 200 --samples 100 1000
"""

from __future__ import annotations

import argparse
import time

import torch

from astraora.build import make_device
from astraora.hybrid import HybridLayer
from astraora.surrogate.auto import auto_rank, resolve_integrator
from astraora.surrogate.lowrank import best_rank_error

FAMILIES = ("mzi", "mrr", "slm", "matvec")


def family_config(family: str):
    """The run config of ``device=<family> zo.direction=gaussian``: its device entry, and θ's rate under
    random-direction ZO as a run resolves it (``physical_optimizer.lr``)."""
    from hydra import compose, initialize_config_dir

    from astraora.paths import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"device={family}", "zo.direction=gaussian"])
    return cfg.device, float(cfg.physical_optimizer.lr)


def track(
    device: str,
    d_in: int,
    d_out: int,
    rank: int,
    integrator: dict,
    growth: float | None,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    checkpoints: tuple[int, ...],
) -> dict:
    dev = make_device(family_config(device)[0], d_in, d_out, seed, "physical")
    layer = HybridLayer(
        dev,
        mode="exact+sm",
        rank=rank,
        integrator=resolve_integrator(integrator, d_in, rank),
        health_growth=growth,
        seed=seed,
    )
    layer.train()
    layer.measure_residual = False
    opt = torch.optim.Adam([dev.theta], lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    signal = torch.randn(dev.theta.shape, generator=gen)
    ratios, at = [], {}
    with torch.no_grad():
        layer(torch.randn(batch, d_in, generator=gen))  # the initial readout
    upkeep0 = layer.ledger.queries["surrogate"] + layer.ledger.queries["readout"]
    for step in range(1, steps + 1):
        opt.zero_grad()
        dev.theta.grad = torch.randn(dev.theta.shape, generator=gen) + 0.1 * signal
        opt.step()
        layer.after_optimizer_step()
        with torch.no_grad():
            layer(torch.randn(batch, d_in, generator=gen))  # forward; the health checks measure here
            a = layer.ledger.oracle_matrix().detach()
            ratio = float((layer.surrogate.matrix() - a).norm() / a.norm()) / best_rank_error(a, rank)
        ratios.append(ratio)
        if step in checkpoints:
            at[step] = ratio
    upkeep = layer.ledger.queries["surrogate"] + layer.ledger.queries["readout"] - upkeep0
    return {
        "at": at,
        "mean": sum(ratios) / len(ratios),
        "max": max(ratios),
        "per_step": upkeep / steps,
        "rebuilds": layer.health_rebuilds,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="mzi", choices=FAMILIES)
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-out", type=int, default=1024)
    parser.add_argument("--rank", default="auto")
    parser.add_argument("--samples", type=int, nargs="+", default=[100], help="M_sm of psi_implicit")
    parser.add_argument(
        "--growth", nargs="+", default=["off", "0.1", "0.25"], help="surrogate.health_growth values (off: null)"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=None, help="θ's rate (default: the family's)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rank = auto_rank(args.d_in, args.d_out) if args.rank == "auto" else int(args.rank)
    lr = args.lr if args.lr is not None else family_config(args.device)[1]
    checkpoints = tuple(s for s in (1, 10, 30, 100, 300, 1000) if s <= args.steps)
    print(
        f"{args.device} {args.d_in} → {args.d_out}, rank {rank}, θ rate {lr}, {args.steps} steps, batch {args.batch}, "
        f"seed {args.seed}; error / best rank-r error"
    )
    head = " | ".join(f"step {s}" for s in checkpoints)
    print(f"| integrator | M_sm | health_growth | {head} | mean | max | upkeep queries / step | health rebuilds |")
    print("|---|---|---|" + "---|" * len(checkpoints) + "---|---|---|---|")
    runs = [("rebuild", None, None)] + [("psi_implicit", m, g) for m in args.samples for g in args.growth]
    for name, samples, growth in runs:
        start = time.time()
        g = None if growth in (None, "off") else float(growth)
        spec = {"name": name} if name == "rebuild" else {"name": name, "samples": samples}
        out = track(
            args.device, args.d_in, args.d_out, rank, spec, g, args.steps, lr, args.batch, args.seed, checkpoints
        )
        cells = " | ".join(f"{out['at'][s]:.3f}" for s in checkpoints)
        print(
            f"| {name} | {samples or '—'} | {growth or '—'} | {cells} | {out['mean']:.3f} | {out['max']:.3f} | "
            f"{out['per_step']:.0f} | {out['rebuilds']} |  ({time.time() - start:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
