"""The accuracy-parity study: digital, exact, exact+sm, zo+exact and zo+sm per task and device,
the gap to digital split into device, surrogate and ZO parts; a table and a plot per task.

    python scripts/parity_study.py [--tasks digits pydoc_text image_folder synthetic_audio]
                                   [--devices mzi mrr slm] [--seeds 0] [--jobs 1] [--out outputs/parity]
                                   [--modes digital exact exact+sm zo+exact zo+sm] [--set KEY=VALUE ...]
    python scripts/parity_study.py --report-only [DIR ...] --out OUT   # report from finished runs

See astraora/report/parity.py and docs/PARITY.md. Exit code 2 when no run finished.
"""

import sys

from astraora.report.parity import main

if __name__ == "__main__":
    sys.exit(main())
