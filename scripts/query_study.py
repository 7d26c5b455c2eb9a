"""The query-efficiency study's report: test metric against total hardware queries, per variant.

    python scripts/query_study.py SWEEP_DIR... [--out OUT] [--seeds 0 1 2]    # default OUT: the first SWEEP_DIR

The runs come from the multiruns of conf/experiment/study_query*.yaml. A run's variant is named
from its settings: paper (the defaults), M<zo.samples>, every<zo.every>, reuse_sketch, r<zo.batch_rank>,
e<zo.batch_energy>, another direction law, and query_efficient for r2 (conf/experiment/query_efficient.yaml). Per
task and device, each variant's test metric (mean ± std over seeds), mean total queries, and against paper
on the same device over the same seeds: the query ratio (sum of queries / sum of paper's) and the paired
metric difference (± s.e.); the plot has the Pareto front of each panel.
Writes OUT/query_study.md, OUT/query_study.csv and OUT/query_study.png; exit code 2 when no run finished.
The maths and the tables live in astraora.report.compare (query_rows, query_markdown, ...).
"""

import argparse
import sys
from pathlib import Path

from astraora.report.compare import find_run_dirs, load_run, plot_queries, query_markdown, query_rows, write_rows_csv


def collect(paths, seeds=None) -> list[dict]:
    """One row per (task, variant) of the runs under ``paths``, over their finished seeds (those in ``seeds``)."""
    return query_rows(map(load_run, find_run_dirs(paths)), seeds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--seeds", nargs="+", type=int, help="report these seeds only (default: all finished)")
    args = parser.parse_args(argv)
    rows, out = collect(args.dirs, args.seeds), args.out or args.dirs[0]
    if not rows:
        print(f"query_study: no finished runs under {' '.join(map(str, args.dirs))}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "query_study.md").write_text(query_markdown(rows), encoding="utf-8")
    write_rows_csv(rows, out / "query_study.csv")
    plot_queries(rows).savefig(out / "query_study.png", dpi=120)
    print(query_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
