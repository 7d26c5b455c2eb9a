"""Query-efficiency options (docs/ALGORITHM.md §9): an estimate every k-th step (``zo.every``,
``zo.between``), a fixed sketch for the surrogate (``integrator.reuse_sketch``) and the
query-efficient preset: each one's ledger count equals its formula, and what it keeps is checkpointed."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, random_batch

from astraora.config import validate
from astraora.devices import MZIMesh
from astraora.errors import ConfigError
from astraora.hybrid import HybridLayer
from astraora.ledger import QueryLedger
from astraora.rng import make_generator
from astraora.surrogate import LowRankSurrogate, make_integrator
from astraora.zo import ZOEstimator

pytestmark = pytest.mark.usefixtures("float64")


def zo_estimator(samples=12, seed=0, **kwargs) -> ZOEstimator:
    return ZOEstimator(samples=samples, generator=make_generator(seed, "zo"), **kwargs)


data = random_batch


# --------------------------------------------------------------------------- every k-th step
def test_every_kth_step_queries_only_then_and_gives_zero_or_the_last_estimate():
    n, m, batch = 6, 5, 3
    device = MZIMesh(n, m, seed=0, name="d")
    ledger = QueryLedger(device)
    x, g = data(batch, n, m)
    for between in ("momentum", "last"):
        zo = zo_estimator(8, every=3, between=between)
        before = ledger.queries["zo"]
        grads = [zo.estimate(ledger, x, g, ledger.query(x, "forward")) for _ in range(7)]
        assert ledger.queries["zo"] - before == 3 * zo.queries_per_step(batch, m, device)  # calls 1, 4, 7
        for i in (1, 2, 4, 5):
            expected = grads[i - i % 3] if between == "last" else torch.zeros_like(grads[0])
            assert torch.equal(grads[i], expected)
        assert grads[0].abs().sum() > 0


def test_every_kth_step_carries_adam_momentum_in_a_hybrid_layer():
    n, m = 6, 5
    device = MZIMesh(n, m, seed=0, name="d")
    layer = HybridLayer(device, rank=2, zo=zo_estimator(4, every=2), integrator={"name": "psi_implicit", "samples": 3})
    opt = torch.optim.Adam([device.theta], lr=1e-2)
    moved = []
    for _ in range(4):
        before = device.theta.detach().clone()
        opt.zero_grad()
        layer(torch.randn(3, n)).pow(2).sum().backward()
        opt.step()
        layer.after_optimizer_step()
        moved.append(float((device.theta.detach() - before).norm()))
    assert layer.ledger.queries["zo"] == 2 * 4 * 3  # steps 1 and 3: M = 4 settings × q = 3
    assert all(step > 0 for step in moved)  # in-between steps still move θ (Adam's momentum)


@pytest.mark.parametrize("chunk, reducer", [("auto", None), (2, None), (4, lambda t: t.clone())])
def test_every_kth_step_is_independent_of_chunking_and_of_the_redraw(chunk, reducer):
    """The same estimates, measured and skipped alike, for any chunk size and with a reducer (the
    data-parallel path: measure, reduce, restore the generator, redraw the same directions)."""
    n, m, batch = 6, 5, 3
    x, g = data(batch, n, m)

    def estimates(chunk_size, reducer):
        zo = zo_estimator(6, every=2, between="last", chunk_size=chunk_size)
        zo.reducer = reducer
        ledger = QueryLedger(MZIMesh(n, m, seed=0, name="d"))
        return torch.stack([zo.estimate(ledger, x, g) for _ in range(4)])

    torch.testing.assert_close(estimates(chunk, reducer), estimates(1, None), rtol=1e-10, atol=1e-12)


def test_every_counter_and_last_estimate_are_checkpointed():
    n, m, batch = 6, 5, 3
    x, g = data(batch, n, m)
    led = QueryLedger(MZIMesh(n, m, seed=0, name="d"))
    zo = zo_estimator(6, every=2, between="last")
    for _ in range(3):
        zo.estimate(led, x, g)
    twin = zo_estimator(6, seed=5, every=2, between="last")
    twin.load_state_dict(zo.state_dict())
    assert torch.equal(zo.estimate(led, x, g), twin.estimate(led, x, g))  # call 4: the last estimate
    assert torch.equal(zo.estimate(led, x, g), twin.estimate(led, x, g))  # call 5: a new one


def test_a_state_saved_by_an_earlier_version_still_loads():
    """Checkpoints of earlier versions also hold ``history`` (estimates kept for a direction option
    since removed): it is ignored, and the kept state (generator, call counter, last estimate) is
    restored."""
    n, m, batch = 6, 5, 3
    x, g = data(batch, n, m)
    led = QueryLedger(MZIMesh(n, m, seed=0, name="d"))
    zo = zo_estimator(6, every=2, between="last")
    for _ in range(3):
        zo.estimate(led, x, g)
    old = {**zo.state_dict(), "history": [torch.randn(30), torch.randn(30)]}
    twin = zo_estimator(6, seed=5, every=2, between="last")
    twin.load_state_dict(old)
    assert set(twin.state_dict()) == {"generator", "device_generator", "calls", "last"}
    for _ in range(2):
        assert torch.equal(zo.estimate(led, x, g), twin.estimate(led, x, g))


# --------------------------------------------------------------------------- fixed sketch
def _tracked(
    reuse: bool,
    steps: int = 4,
    drift: float = 0.0,
    noise: float = 0.0,
    rebuild_at: tuple = (),
    forget: bool = False,
    n: int = 6,
    M_sm: int = 7,
):
    """A psi_implicit surrogate following θ through ``steps`` random moves; ``forget`` drops the
    cache before every update (the same fixed Z, queried fresh at θ₀). A fixed sketch is kept only
    where M_sm >= n."""
    m, r = 8, 3
    device = MZIMesh(n, m, seed=0, name="d", nonideal={"drift_std": drift, "output_noise": noise})
    ledger = QueryLedger(device)
    sur = LowRankSurrogate(n, m, r, tuple(device.theta.shape))
    integ = make_integrator("psi_implicit", generator=make_generator(0, "sketch"), samples=M_sm, reuse_sketch=reuse)
    sur.readout(ledger)
    gen = torch.Generator().manual_seed(1)
    counts = []
    for step in range(1, steps + 1):
        if step in rebuild_at:
            sur.readout(ledger)  # a health rebuild in the forward pass, at the θ of the last update
        with torch.no_grad():
            device.theta.add_(0.05 * torch.randn(device.theta.shape, generator=gen))
        ledger.step_drift()  # as the layer does, once per training step
        if forget:
            integ._cache = None
        before = ledger.queries["surrogate"]
        integ.step(sur, ledger, step)
        counts.append(ledger.queries["surrogate"] - before)
    integ.last_device = device
    return sur, integ, counts, (r, M_sm)


def test_reused_sketch_halves_the_sketch_queries_and_gives_the_same_surrogate():
    sur, integ, counts, (r, M_sm) = _tracked(reuse=True)
    fresh, _, fresh_counts, _ = _tracked(reuse=True, forget=True)
    assert counts == [2 * r + 2 * M_sm] + [2 * r + M_sm] * 3
    assert counts[1] == integ.queries_per_update(r, reused=True)
    assert fresh_counts == [2 * r + 2 * M_sm] * 4 == [integ.queries_per_update(r)] * 4
    assert integ.reused == 3
    assert torch.allclose(sur.matrix(), fresh.matrix(), atol=1e-10)  # a noise-free device: same readings


def test_reused_sketch_is_refused_after_drift_and_still_right_after_a_rebuild():
    _, integ, counts, (r, M_sm) = _tracked(reuse=True, drift=1e-3)
    assert counts == [2 * r + 2 * M_sm] * 4 and integ.reused == 0  # drift moved A: fresh θ₀ readings
    sur, integ, counts, _ = _tracked(reuse=True, rebuild_at=(2,))
    fresh, _, _, _ = _tracked(reuse=True, rebuild_at=(2,), forget=True)
    assert integ.reused == 3  # the rebuild read A at the θ the cache was taken at: still valid
    assert torch.allclose(sur.matrix(), fresh.matrix(), atol=1e-10)


def test_reused_sketch_with_output_noise_tracks_as_well_as_fresh_readings():
    """With noisy readings the reused θ₀ readings of Z are still readings at θ₀ (their noise is
    the previous update's): the surrogate's error stays that of fresh readings."""
    rel = {}
    for forget in (False, True):
        sur, integ, _, _ = _tracked(reuse=True, steps=6, noise=0.01, forget=forget)
        truth = integ.last_device.matrix().detach()
        rel[forget] = float((sur.matrix() - truth).norm() / truth.norm())
    assert rel[False] < 1.5 * rel[True] + 0.02


def test_fixed_sketch_is_not_kept_where_it_has_fewer_rows_than_the_layer_has_inputs(caplog):
    """M_sm < n: a fixed Z would never probe n − M_sm input directions, so every update draws a
    fresh one (2r + 2·M_sm queries each, nothing reused), with one warning."""
    with caplog.at_level("WARNING"):
        _, integ, counts, (r, M_sm) = _tracked(reuse=True, n=8, M_sm=5)
    assert counts == [2 * r + 2 * M_sm] * 4
    assert integ.reused == 0 and integ._cache is None and integ._fixed_z is None
    assert not integ.reuses(8) and integ.reuses(5)
    assert sum("reuse_sketch" in record.message for record in caplog.records) == 1


def test_auto_integrator_counts_a_fixed_sketch_only_where_it_is_kept():
    from astraora.surrogate.auto import resolve_integrator

    spec = {"name": "auto", "samples": 10, "reuse_sketch": True}
    assert resolve_integrator(spec, d_in=10, rank=2)["name"] == "rebuild"  # 10 <= 2·2 + 10 (Z kept)
    assert resolve_integrator(spec, d_in=20, rank=2)["name"] == "rebuild"  # 20 <= 2·2 + 2·10 (Z not kept)
    assert resolve_integrator(spec, d_in=25, rank=2)["name"] == "psi_implicit"


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "override, key",
    [
        ("zo.between=sometimes", "zo.between"),
        ("zo.every=0", "zo.every"),
        ("integrator.reuse_sketch=often", "integrator.reuse_sketch"),
    ],
)
def test_bad_query_option_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config([override]), import_targets=False)


def test_query_efficient_preset_sets_only_method_keys():
    cfg = compose_config(["experiment=query_efficient", "task=synthetic_audio", "device=mrr"])
    assert cfg.task.name == "synthetic_audio" and cfg.device.family == "mrr"
    validate(cfg, import_targets=False)
    plain = compose_config(["task=synthetic_audio", "device=mrr"])
    assert (cfg.zo.samples, cfg.zo.every, cfg.zo.batch_rank) == (100, 1, 2)
    assert cfg.task == plain.task and cfg.device == plain.device and cfg.integrator == plain.integrator
    assert {k: v for k, v in cfg.zo.items() if k != "batch_rank"} == {
        k: v for k, v in plain.zo.items() if k != "batch_rank"
    }
