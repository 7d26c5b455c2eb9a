"""Compare runs with their digital baselines: a markdown table per task, comparison.csv, plots and
report.html (one self-contained page: the tables and the plots embedded, for a browser).

    python scripts/compare.py DIR... [--out OUTDIR] [--metric val/acc] [--strict-budget]

DIR is a run directory or a multirun directory (searched recursively for summary.json). The gap
to digital is in percentage points for accuracy, in % of the digital value for loss-like metrics.
A hybrid run whose digital run (same seed) had another training budget (epochs, steps, batch
limits) is flagged in the table and warned about; --strict-budget leaves its gap out.
Exit code 2 when no run directory is found.
"""

import sys

from astraora.report.compare import main

if __name__ == "__main__":
    sys.exit(main())
