"""The accuracy-parity study's report: the gap to the digital twin split into device, surrogate and ZO.

    python scripts/parity_study.py SWEEP_DIR... [--out OUT]    # default OUT: the first SWEEP_DIR

The runs come from the multiruns of conf/experiment/study_parity*.yaml. Per task and device, each
gap is a paired difference per seed (mean ± sample std over the seeds that have both runs),
positive = worse: accuracy in points, losses in % of the better run's loss (ALGORITHM.md §6):
device = exact − digital, surrogate = exact+sm − exact, ZO = zo+exact − exact, combined = zo+sm − exact
(the method against the device's ceiling; target ≤ 0.5 pt or ≤ 1 %), total = zo+sm − digital.
Writes OUT/parity.md, OUT/parity.csv and OUT/parity_<task>.png; exit code 2 when no run finished.
The maths and the tables live in astraora.report.compare (parity_cells, parity_markdown, ...).
"""

import argparse
import sys
from pathlib import Path

from astraora.report.compare import (
    find_run_dirs,
    load_run,
    parity_cells,
    parity_markdown,
    plot_parity,
    write_parity_csv,
)


def collect(paths) -> list[dict]:
    """The parity cells of the runs under ``paths`` (an unreadable summary.json raises: the sweep is broken)."""
    return parity_cells(map(load_run, find_run_dirs(paths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cells, out = collect(args.dirs), args.out or args.dirs[0]
    if not cells:
        print(f"parity: no finished runs under {' '.join(map(str, args.dirs))}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity.md").write_text(parity_markdown(cells) + "\n", encoding="utf-8")
    write_parity_csv(cells, out / "parity.csv")
    for task in dict.fromkeys(c["task"] for c in cells):
        plot_parity(cells, task).savefig(out / f"parity_{task}.png", dpi=110)
    print((out / "parity.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
