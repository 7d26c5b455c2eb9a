"""The paper authors' training loop against astraora's, for the surrogate's timing.

The same configs are trained three ways, paired by seed: ``fresh`` (astraora's order: the backward of
step t uses Â(θ_t)), ``stale`` (the backward uses the surrogate before the last update, Â(θ_{t−1})) and
``stale+lost`` (also the update after each evaluation pass dropped), emulated around an unchanged
HybridLayer by scripts/_stale.py, which also records per backward the surrogate's error and the input
gradient's cosine to the true one (oracle diagnostics: no query) in ``stale.json`` beside summary.json.

    python scripts/stale_surrogate_study.py VARIANT -m experiment=study_stale,study_stale_synthetic_audio \
        device=mzi,mrr seed=0,1,2          # per VARIANT in fresh, stale, stale+lost (conf/experiment/study_stale*.yaml)
    python scripts/stale_surrogate_study.py --report outputs/stale_surrogate

The jobs run one after another in this process (the default launcher), which installs the callback;
runs go to outputs/stale_surrogate/<variant>/<overrides>. The report (astraora.report.compare.stale_table):
test metrics (mean over seeds), paired differences against ``fresh`` ± their standard error, and the
means over steps of the error and the cosine, per setting (tracked, or full_rank: an orthogonal sketch),
task and device.
"""

import sys
from pathlib import Path

from _stale import VARIANTS, AuthorsOrder, SurrogateOrder, with_order  # noqa: F401  (the emulation, re-exported)
from _study import train_wrapped

from astraora.report.compare import stale_paired as paired  # noqa: F401
from astraora.report.compare import stale_records as collect
from astraora.report.compare import stale_table as table

if __name__ == "__main__":
    if sys.argv[1:2] == ["--report"]:
        print(table(collect(Path(sys.argv[2]))))
    elif sys.argv[1:2] and sys.argv[1] in VARIANTS:
        train_wrapped(with_order(sys.argv[1]), f"outputs/stale_surrogate/{sys.argv[1]}", sys.argv[2:])
    else:
        sys.exit(__doc__)
