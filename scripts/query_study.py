"""The query-efficiency study: paper settings vs each query-saving option, table + Pareto plot.

    python scripts/query_study.py [--tasks digits synthetic_audio pydoc_text] [--variants ...]
                                  [--seeds 0 1 2] [--jobs 2] [--out outputs/query_study]

See astraora/report/query_study.py. Exit code 2 when no run finished.
"""

import sys

from astraora.report.query_study import main

if __name__ == "__main__":
    sys.exit(main())
