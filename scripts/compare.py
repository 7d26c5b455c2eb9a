"""Compare runs with their digital baselines: a markdown table per task, comparison.csv and plots.

    python scripts/compare.py DIR... [--out OUTDIR] [--metric val/acc]

DIR is a run directory or a multirun directory (searched recursively for summary.json).
Exit code 2 when no run directory is found.
"""

import sys

from astraora.report.compare import main

if __name__ == "__main__":
    sys.exit(main())
