"""``python train.py OVERRIDES`` run in this process with each run wrapped: the studies that change
what a run does (scripts/zo_variance_study.py, scripts/stale_surrogate_study.py) use it as their
entry point, so that their sweeps are ordinary Hydra multiruns (a scripts-local module)."""

import sys
from collections.abc import Callable


def train_wrapped(wrap: Callable[[Callable], Callable], sweep_dir: str, overrides: list[str]) -> None:
    """Run ``train.py OVERRIDES`` (``-m``: a multirun) with :func:`astraora.train.run` replaced by
    ``wrap(run)``; a multirun writes to ``sweep_dir`` unless ``hydra.sweep.dir`` is given. The jobs
    must run in this process, where the wrapper is installed: another launcher is refused."""
    import astraora.train
    from astraora.cli import main as cli_main

    if any(o.lstrip("+").startswith(("launcher=", "hydra/launcher=")) for o in overrides):
        sys.exit("the jobs must run in this process (the default launcher): leave launcher= out")
    flags, rest = [o for o in overrides if o.startswith("-")], [o for o in overrides if not o.startswith("-")]
    out = [] if any(o.startswith("hydra.sweep.dir=") for o in rest) else [f"hydra.sweep.dir={sweep_dir}"]
    astraora.train.run = wrap(astraora.train.run)
    sys.argv = ["train.py", *flags, *out, *rest]
    cli_main()
