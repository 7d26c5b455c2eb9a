"""Per-layer surrogate settings chosen from the layer's size: ``surrogate.rank: auto`` and
``integrator=auto`` (resolved in :func:`astraora.build.make_layer_factory`, once per physical layer,
since the layers of one model differ in size).

* **rank** ``auto`` = ``min(k, max(AUTO_RANK_FLOOR, k // AUTO_RANK_DIVISOR))`` with k = min(d_in, d_out):
  about a quarter of the layer's narrow side, never below the old fixed default 10 (layers up to
  43 wide keep rank 10) and never above k. 64 → 64: 16; 128 → 128: 32; 512 → 1024: 128; 6144 → 192: 48.
  The measurements behind the rule: docs/archive/PARITY.md, "Surrogate rank and readout by layer size".
* **integrator** ``auto``: a full readout (``rebuild``, d_in queries) at each update when the step
  then costs no more queries than with one ``psi_implicit`` update (2r + 2·M_sm; 2r + M_sm with
  ``reuse_sketch``); the readout's truncated SVD is then the best rank-r surrogate for fewer
  queries. Where the layer's θ-estimate reads A(θ) out anyway and takes that reading from the
  readout (colored differences with ``zo.reuse_readout``), the readout replaces d_in of the
  estimate's queries, so it is always the cheaper step: ``rebuild`` at every size. Otherwise
  ``psi_implicit`` with the given ``samples``/``sketch``/``reuse_sketch``. ``every`` and
  ``rebuild_every`` apply to whichever is chosen.
* ``surrogate.readout_rank``: ``same`` (default) keeps the rank above where the update is a full
  readout; ``full`` keeps the whole matrix there (rank k, no extra query: the readout measured all
  of it). It helped on some tasks and hurt on others, so it is an option, not the default
  (docs/archive/PARITY.md, "Full rank where the surrogate is read out").
"""

from __future__ import annotations

from astraora.choices import AUTO
from astraora.surrogate.validation import validate_surrogate

AUTO_RANK_FLOOR = 10
AUTO_RANK_DIVISOR = 4
PSI_KEYS = ("samples", "sketch", "reuse_sketch")


def auto_rank(d_in: int, d_out: int) -> int:
    """The ``surrogate.rank: auto`` rule for a d_in → d_out layer."""
    k = min(int(d_in), int(d_out))
    return min(k, max(AUTO_RANK_FLOOR, k // AUTO_RANK_DIVISOR))


def resolve_rank(rank, d_in: int, d_out: int) -> int:
    """``rank`` as an integer for a d_in → d_out layer: ``auto`` by :func:`auto_rank`, an integer as is."""
    if rank == AUTO:
        return auto_rank(d_in, d_out)
    validate_surrogate({"rank": rank})
    return int(rank)


def readout_rank(setting: str, integrator: dict, d_in: int, d_out: int, rank: int) -> int:
    """The rank a layer's surrogate keeps: min(d_in, d_out) where ``surrogate.readout_rank`` is
    ``full`` and the layer's update is a full readout (``rebuild``), else ``rank``."""
    validate_surrogate({"readout_rank": setting})
    if setting == "full" and integrator.get("name") == "rebuild":
        return min(int(d_in), int(d_out))
    return int(rank)


def psi_queries(rank: int, samples: int, reuse_sketch: bool = False) -> int:
    """Queries of one psi_implicit update (ALGORITHM.md §4, §9): 2r + 2·M_sm, or 2r + M_sm when
    the sketch's θ₀ readings come from the previous update."""
    return 2 * int(rank) + (1 if reuse_sketch else 2) * int(samples)


def keeps_fixed_sketch(reuse_sketch: bool, samples: int, d_in: int) -> bool:
    """Whether ``reuse_sketch`` applies to a layer of d_in inputs: only where M_sm ≥ n (a fixed Z
    of fewer rows never probes the other n − M_sm input directions)."""
    return bool(reuse_sketch) and int(samples) >= int(d_in)


def resolve_integrator(spec: dict, d_in: int, rank: int, estimate_reuses_readout: bool = False) -> dict:
    """The integrator config for one layer: ``spec`` unchanged unless its name is ``auto``; then
    ``rebuild`` when a step with a full readout (d_in queries) costs no more than one with a
    psi_implicit update, else ``psi_implicit``. ``estimate_reuses_readout``: the layer's θ-estimate
    takes its reading of A(θ) (d_in queries it would otherwise make) from the readout."""
    spec = dict(spec)
    if spec.get("name") != AUTO:
        return spec
    samples = int(spec.get("samples", 100))
    reuse = keeps_fixed_sketch(spec.get("reuse_sketch", False), samples, d_in)
    spared = int(d_in) if estimate_reuses_readout else 0  # the estimate's own reading, replaced by the readout
    if int(d_in) <= psi_queries(rank, samples, reuse) + spared:
        return {"name": "rebuild", "every": spec.get("every", 1), "rebuild_every": spec.get("rebuild_every", 0)}
    return {**spec, "name": "psi_implicit"}
