"""Cosine between one ZO estimate and the oracle VJP, per device and non-ideality setting.

    python scripts/zo_cosine.py [--samples 1000] [--bits 8] [--size 16] [--batch 8]

The oracle is autograd through the simulator (straight-through over phase quantization), the
gradient the paper's ``forward`` setting estimates. Prints one row per (device, queries, reuse).
"""

from __future__ import annotations

import argparse
import math

import torch

from astraora.devices import SLM, MZIMesh
from astraora.ledger import QueryLedger
from astraora.rng import make_generator
from astraora.zo import ZOEstimator


def zo_cosine(
    device_cls, size: int, batch: int, samples: int, nonideal: dict, reuse: bool, mu: float = 1e-4, seed: int = 0
) -> tuple[float, float]:
    """(cosine, ‖ĝ‖ / ‖∇‖) of one estimate on a size × size device at its initial θ."""
    device = device_cls(size, size, seed=seed, name="probe", nonideal=nonideal).double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, size, generator=gen, dtype=torch.float64)
    g = torch.randn(batch, size, generator=gen, dtype=torch.float64)
    ledger = QueryLedger(device)
    y = ledger.query(x, "forward")
    zo = ZOEstimator(samples=samples, mu=mu, reuse_forward=reuse, generator=make_generator(seed, "zo"))
    estimate = zo.estimate(ledger, x, g, y)
    with torch.enable_grad():
        theta = device.theta.detach().requires_grad_(True)
        exact = torch.autograd.grad((device.simulate(x, theta) * g).sum(), theta)[0]
    cos = torch.nn.functional.cosine_similarity(estimate.flatten(), exact.flatten(), dim=0)
    return float(cos), float(estimate.norm() / exact.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("samples", 1000), ("bits", 8), ("size", 16), ("batch", 8), ("seeds", 3)):
        parser.add_argument(f"--{flag}", type=int, default=default)
    args = parser.parse_args()
    bits, resolution = {"phase_bits": args.bits}, 2 * math.pi / 2**args.bits
    cases = [  # label, non-idealities, mu, batch
        ("continuous", {}, 1e-4, args.batch),
        (f"{args.bits}-bit, queries=forward", {**bits, "queries": "forward"}, 1e-4, args.batch),
        (f"{args.bits}-bit, queries=all", {**bits, "queries": "all"}, 1e-4, args.batch),
        (f"{args.bits}-bit, queries=all, mu=2pi/2^{args.bits}", {**bits, "queries": "all"}, resolution, args.batch),
        ("8-bit inputs, B=64 (compressed), reuse", {"input_bits": 8}, 1e-4, 64),
    ]
    for name, cls in (("slm", SLM), ("mzi", MZIMesh)):
        for label, nonideal, mu, batch in cases:
            runs = [zo_cosine(cls, args.size, batch, args.samples, nonideal, True, mu, s) for s in range(args.seeds)]
            cos, ratio = (sum(r[i] for r in runs) / len(runs) for i in (0, 1))
            print(f"{name:4s} {label:44s} cosine {cos:+.3f}  norm ratio {ratio:6.2f}  ", end="")
            print(f"(M={args.samples}, {args.seeds} seeds)")


if __name__ == "__main__":
    main()
