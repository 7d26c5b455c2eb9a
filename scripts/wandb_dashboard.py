"""Create the prepared W&B report that compares hybrid runs with their digital baselines by setting.

    python scripts/wandb_dashboard.py --project P [--entity E] [--task T] [--metric val/acc]
    python scripts/wandb_dashboard.py --dry-run          # print the report as JSON, upload nothing

Uploading needs the W&B report API (pip install "wandb[workspaces]"), a network and a login
(`wandb login`); without them it prints one line and exits with code 1. The runs must have been
logged with logger=wandb (offline runs uploaded with `wandb sync`).
"""

import sys

from astraora.report.dashboard import main

if __name__ == "__main__":
    sys.exit(main())
