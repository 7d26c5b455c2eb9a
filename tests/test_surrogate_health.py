"""The surrogate's health check (astraora.surrogate.health): the batch's view of the errors, the
rules that read a surrogate out again, and their state in a layer's checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from astraora.devices import SLM, MRRBank
from astraora.errors import ConfigError
from astraora.hybrid import HybridLayer
from astraora.rng import make_generator
from astraora.surrogate.health import SurrogateHealth, batch_view
from astraora.zo import ZOEstimator


def drifting_run(health_threshold, steps=150):
    """A layer whose device drifts strongly while θ stays put; returns the final surrogate error.
    The paper's initial range: a matrix with a clear rank-8 part, so that a residual of 0.5 means
    lost track (centred weights have a flat spectrum, and rank 8 alone leaves about that)."""
    device = MRRBank(24, 16, seed=0, name="d", init_high=math.pi / 4, nonideal={"drift_std": 0.05})
    layer = HybridLayer(
        device,
        mode="zo+sm",
        rank=8,
        zo=ZOEstimator(2, generator=make_generator(0, "zo")),
        integrator={"name": "frozen"},
        health_threshold=health_threshold,
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        layer(torch.randn(32, 24, generator=gen))
        layer.after_optimizer_step()
    return layer.diagnostics()["surrogate/rel_error"], layer


def test_health_check_rebuilds_a_drifting_surrogate():
    unchecked, _ = drifting_run(None)
    checked, layer = drifting_run(0.5)
    best = layer.diagnostics()["surrogate/rel_error_best_rank_r"]
    assert unchecked > 2.5 * best  # frozen without a health check loses track of the device
    assert checked < 1.5 * best and checked < 0.5 * unchecked
    assert layer.ledger.queries["readout"] > 24  # rebuilds happened, counted as readout


def psi_walk(health_growth, integrator=None, steps=60):
    """θ walks by Adam-like steps of 0.01 per control under psi_implicit with a thin sketch
    (M_sm = 8 < n = 24), which drifts away from the best rank-r surrogate."""
    device = SLM(24, 16, seed=0, name="d")
    layer = HybridLayer(
        device,
        mode="exact+sm",
        rank=4,
        health_growth=health_growth,
        integrator=integrator or {"name": "psi_implicit", "samples": 8},
    )
    gen = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(steps):
        layer(torch.randn(64, 24, generator=gen))
        with torch.no_grad():
            device.theta.add_(0.01 * torch.randn(device.theta.shape, generator=gen).sign())
        layer.after_optimizer_step()
        d = layer.diagnostics()
        ratios.append(d["surrogate/rel_error"] / d["surrogate/rel_error_best_rank_r"])
    return ratios, layer


def test_health_growth_keeps_psi_near_the_best_rank_r_surrogate():
    free, _ = psi_walk(None)
    held, layer = psi_walk(0.1)
    assert max(free[-10:]) > 1.3  # psi_implicit with a thin sketch drifts
    assert max(held[5:]) < 1.25 and layer.health_rebuilds >= 2
    assert layer.ledger.queries["readout"] == 24 * (1 + layer.health_rebuilds)
    # a layer read out after every update is never checked: its window never fills, so no view is computed
    import astraora.surrogate.health as health

    original, calls = health.batch_view, []
    health.batch_view = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    try:
        _, rebuilt = psi_walk(0.1, integrator={"name": "rebuild"}, steps=10)
        _, every_third = psi_walk(0.1, integrator={"name": "psi_implicit", "samples": 8, "rebuild_every": 3}, steps=9)
    finally:
        health.batch_view = original
    assert rebuilt.health_rebuilds == 0 and rebuilt.health.reference_kind is None
    # with a readout after every 3rd update each window fills just before it: all 9 batches count;
    # the rebuild layer computed none
    assert len(calls) == 9
    # the reference, its window and the rebuild count survive a checkpoint
    state = layer.get_extra_state()
    _, restored = psi_walk(0.1, steps=1)
    restored.set_extra_state(state)
    assert restored.health.window == layer.health.window and len(layer.health.window) == SurrogateHealth.WINDOW
    assert (restored.health.reference_residual, restored.health.reference_kind, restored.health_rebuilds) == (
        layer.health.reference_residual,
        layer.health.reference_kind,
        layer.health_rebuilds,
    ) and layer.health.reference_kind == "view"


def test_batch_view_gives_the_errors_on_the_inputs_the_batch_spans():
    """From a batch's inputs and readings alone: with B ≥ n rows the surrogate's error and the best
    rank-r error in the Frobenius norm (what the oracle says), whatever the inputs' conditioning;
    with B < n the same for A restricted to the batch's input subspace."""
    from astraora.surrogate.lowrank import best_rank_error

    gen = torch.Generator().manual_seed(0)
    f64 = dict(generator=gen, dtype=torch.float64)
    a = torch.randn(9, 12, **f64)
    approx = a + 0.05 * torch.randn(9, 12, **f64)
    u, s, vh = torch.linalg.svd(approx)
    surrogate = (u[:, :3] * s[:3]) @ vh[:3]  # some rank-3 surrogate
    x = torch.randn(400, 12, **f64)
    error, tail = batch_view(x, x @ a.T, x @ surrogate.T, 3)
    torch.testing.assert_close(error, (surrogate - a).square().sum())
    torch.testing.assert_close(tail.sqrt() / a.norm(), torch.tensor(best_rank_error(a, 3), dtype=torch.float64))
    skewed = x * torch.logspace(-0.6, 0, 12, dtype=torch.float64)  # features not isotropic
    for got, want in zip(batch_view(skewed, skewed @ a.T, skewed @ surrogate.T, 3), (error, tail), strict=True):
        torch.testing.assert_close(got, want)
    short = x[:7]  # 7 rows < 12 inputs
    basis = torch.linalg.svd(short, full_matrices=False)[2]  # (7, 12): the rows' span
    error, tail = batch_view(short, short @ a.T, short @ surrogate.T, 3)
    torch.testing.assert_close(error, ((surrogate - a) @ basis.T).square().sum())
    torch.testing.assert_close(tail, torch.linalg.svdvals(a @ basis.T)[3:].square().sum())
    assert batch_view(x[:3], x[:3] @ a.T, x[:3] @ surrogate.T, 3) is None  # spans 3 inputs: fitted exactly
    assert batch_view(x, x @ a[:3].T, x @ surrogate[:3].T, 3) is None  # 3 outputs
    low = torch.randn(9, 2, **f64) @ torch.randn(2, 12, **f64)
    assert batch_view(x, x @ low.T, x @ surrogate.T, 3) is None  # a rank-2 device
    x32, low32 = x.float(), low.float()  # ... read in float32
    assert batch_view(x32, x32 @ low32.T, x32 @ surrogate.float().T, 3) is None


def test_batch_view_sees_a_drift_through_output_noise_and_skewed_features():
    """Inputs spread over three decades and readings with 5 % noise: the ratio of a surrogate 1.2×
    the best error to the best one's stays near 1.2 (S⁻¹ amplifies the noise at most 1/rcond = 10
    times; keeping every direction down to 10⁻³ of the largest, the noise drowned it: 1.03)."""

    gen = torch.Generator().manual_seed(0)
    n, m, r = 64, 128, 16
    a = torch.randn(m, n, generator=gen) / n**0.5
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    best = (u[:, :r] * s[:r]) @ vh[:r]
    turn = torch.randn(m, r, generator=gen) @ vh[:r]
    drifted = best + turn * ((a - best).norm() * (1.2**2 - 1) ** 0.5 / turn.norm())  # 1.2 × the best error

    def kappa(surrogate):
        sums = torch.zeros(2, dtype=torch.float64)
        batches = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(256, n, generator=batches) * torch.logspace(-3, 0, n)
            y = x @ a.T
            y = y + 0.05 * y.std() * torch.randn(y.shape, generator=batches)
            sums += torch.stack(batch_view(x, y, x @ surrogate.T, r))
        return float((sums[0] / sums[1]).sqrt())

    assert kappa(drifted) / kappa(best) == pytest.approx(1.2, abs=0.03)


def test_health_growth_sees_drift_behind_a_falling_best_error():
    """The device's tail (what rank r cannot hold) shrinks while its rank-r part turns away from a
    frozen surrogate, keeping the surrogate's plain residual level: a drift of 1/c against the best
    rank-r error. Measured as the error over the best rank-r error on the batch's inputs, the rule
    sees it; against the plain residual first measured after the readout, it would not."""
    import astraora.surrogate.health as health

    def walk(plain: bool):
        layer = falling_best_error_layer()
        xs = torch.Generator().manual_seed(2)
        original = health.batch_view
        if plain:
            health.batch_view = lambda *args, **kwargs: None
        try:
            return [fired for fired in falling_best_error_walk(layer, lambda: torch.randn(200, 12, generator=xs))]
        finally:
            health.batch_view = original

    seen = walk(plain=False)
    # the first window (c = 1, 0.95, 0.9) sets the reference; the window of c = 0.9, 0.85, 0.8 is
    # the first over 1.1× it
    assert seen.index(True) == 4
    assert not any(walk(plain=True))  # the plain residual stays level: never fires


def falling_best_error_layer() -> HybridLayer:
    """A 12 → 10 MatVec layer (θ = A) with a frozen rank-3 surrogate and ``health_growth=0.1``."""
    from astraora.devices import MatVec

    layer = HybridLayer(
        MatVec(12, 10, seed=0, name="d"), mode="exact+sm", rank=3, integrator={"name": "frozen"}, health_growth=0.1
    )
    return layer.train()


def falling_best_error_walk(layer: HybridLayer, batch, steps: int = 15):
    """Sets A = head + c·tail + √(1 − c²)·turn for c from 1 to 0.3 (the tail, all rank 3 cannot hold,
    shrinks; the head turns by as much, so a frozen surrogate's residual stays level) and sends
    ``batch()`` forward at each; yields whether the health check read the layer out."""
    gen = torch.Generator().manual_seed(1)
    n, m, r = layer.d_in, layer.d_out, 3
    q_out, _ = torch.linalg.qr(torch.randn(m, m, generator=gen))
    q_in, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    head = q_out[:, :r] @ torch.diag(torch.tensor([3.0, 2.5, 2.0])) @ q_in[:, :r].T
    tail = q_out[:, r:] @ torch.diag(torch.full((m - r,), 0.5)) @ q_in[:, r:m].T
    turn = q_out[:, :r] @ torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 1.0], [0.0, -1.0, 0.0]]) @ q_in[:, :r].T
    turn = turn * tail.norm() / turn.norm()
    for c in torch.linspace(1.0, 0.3, steps):
        with torch.no_grad():
            layer.device.theta.copy_(head + float(c) * tail + float((1 - c**2).sqrt()) * turn)
        before = layer.health_rebuilds
        layer(batch())
        yield layer.health_rebuilds > before


def test_health_growth_does_not_fire_on_batch_noise():
    """θ stands still, so the surrogate stays the best rank-r one; batches of 16 rows (fewer than the
    24 inputs) each see A on another subspace: 60 steps without a rebuild."""
    device = SLM(24, 16, seed=0, name="d")
    layer = HybridLayer(
        device, mode="exact+sm", rank=4, health_growth=0.1, integrator={"name": "psi_implicit", "samples": 8}
    )
    layer.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        layer(torch.randn(16, 24, generator=gen) * torch.logspace(-1, 0, 24))
        layer.after_optimizer_step()
    assert layer.health.reference_kind == "view" and layer.health_rebuilds == 0


def test_health_growth_falls_back_to_the_plain_residual_when_batches_stop_telling():
    """A short batch after a view reference is skipped; SurrogateHealth.WINDOW of them in a row, and the rule
    starts over on the plain residual (a change in the data's shape does not switch it off)."""
    layer = falling_best_error_layer()
    gen = torch.Generator().manual_seed(0)
    for _ in range(SurrogateHealth.WINDOW):
        layer(torch.randn(50, 12, generator=gen))
    assert layer.health.reference_kind == "view" and layer.health.reference_residual is not None
    layer(torch.randn(2, 12, generator=gen))  # 2 rows, rank 3: cannot tell
    assert layer.health.reference_kind == "view" and len(layer.health.window) == SurrogateHealth.WINDOW
    for _ in range(SurrogateHealth.WINDOW - 1):
        layer(torch.randn(2, 12, generator=gen))
    assert layer.health.reference_kind == "plain" and len(layer.health.window) == 1


def test_health_growth_is_checked_before_training(make_cfg):
    from astraora.config import validate

    for bad, match in (("0", "give a number > 0"), ("high", "give a number > 0")):
        with pytest.raises(ConfigError, match=f"surrogate.health_growth.*{match}"):
            validate(make_cfg(f"surrogate.health_growth={bad}", out="x"))
    with pytest.raises(ConfigError, match="health_growth=-1"):
        HybridLayer(SLM(4, 4, name="d"), mode="exact+sm", rank=2, health_growth=-1)


@pytest.mark.parametrize("how", ["integrator", "health"])
def test_every_full_readout_resets_the_health_reference(how):
    """The reference of ``health_growth`` is the surrogate's error just after its last full readout:
    whether the integrator read the device out (``rebuild_every``) or the health check did, the
    next window measures a fresh reference. Kept across a readout, it would compare a newly
    rebuilt surrogate against a worn one's error and never fire again."""
    device = SLM(24, 16, seed=0, name="d")
    integrator = {"name": "psi_implicit", "samples": 8, "rebuild_every": 3 if how == "integrator" else 0}
    layer = HybridLayer(device, mode="exact+sm", rank=4, health_growth=0.1, integrator=integrator).train()
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 7):
        layer(torch.randn(64, 24, generator=gen))
        if how == "health" and step == 5:
            assert layer.health.reference_residual is not None
            layer.health.reference_residual = 1e-9  # any error now is growth: the next window reads out
            before = layer.health_rebuilds
            layer(torch.randn(64, 24, generator=gen))
            assert layer.health_rebuilds == before + 1
            assert layer.health.reference_residual is None and layer.health.window == []
            return
        with torch.no_grad():
            device.theta.add_(0.01 * torch.randn(device.theta.shape, generator=gen).sign())
        layer.after_optimizer_step()
        if how == "integrator" and step == 3:  # the third θ update ended in a full readout
            assert layer.health.reference_residual is None and layer.health.window == []
            return
        assert step < 3 or how == "health"
    pytest.fail("no readout happened")


def _view(error2: float, best2: float, have: float = 1.0) -> torch.Tensor:
    """A batch's sums as SurrogateHealth.sums gives them: [residual², ‖Y‖², e², b², view]."""
    return torch.tensor([1.0, 100.0, error2, best2, have], dtype=torch.float64)


def test_growth_rule_on_given_sums():
    """The first window after a readout sets κ₀; the window's κ = √(Σe²/Σb²) over the last three
    batches fires above (1 + g)·κ₀, not on one batch's excess."""
    health = SurrogateHealth(growth=0.1)
    assert not any(health.decide(_view(1.0, 1.0), view=True) for _ in range(SurrogateHealth.WINDOW))
    assert (health.reference_residual, health.reference_kind) == (1.0, "view")
    # windows (1, 1, 1.3), (1, 1.3, 1.3): κ = 1.05, 1.10 (not above 1.1); (1.3, 1.3, 1.3): 1.14
    assert [health.decide(_view(1.3, 1.0), view=True) for _ in range(3)] == [False, False, True]
    assert health.rebuilds == 1 and health.last_residual == pytest.approx(0.1)
    health.reset()
    assert (health.reference_residual, health.reference_kind, health.window) == (None, None, [])
    # a view counts only where every process had one: 1 of 2 processes makes it a plain batch
    health.decide(_view(1.0, 1.0, have=1.0), view=True, world_size=2)
    assert health.reference_kind == "plain" and health.window == [[1.0, 100.0]]
    # the threshold rule: ‖Y − X Âᵀ‖/‖Y‖ = 0.6 > 0.5
    limit = SurrogateHealth(threshold=0.5)
    assert limit.decide(torch.tensor([0.36, 1.0, 0, 0, 0], dtype=torch.float64), view=False)
    assert limit.rebuilds == 1 and limit.last_residual == pytest.approx(0.6)
    assert not limit.decide(torch.tensor([0.16, 1.0, 0, 0, 0], dtype=torch.float64), view=False)


def test_a_view_is_computed_only_where_the_window_can_fill():
    health = SurrogateHealth(growth=0.1)
    assert not SurrogateHealth().wants_view(lambda step: False, 0)  # the growth rule is off
    assert health.wants_view(lambda step: False, 0)  # no readout ahead
    assert not health.wants_view(lambda step: True, 0)  # every update a readout (rebuild)
    every_third = lambda step: step % 3 == 0  # noqa: E731
    assert health.wants_view(every_third, 0)  # 3 batches before the readout after update 3
    assert not health.wants_view(every_third, 1)  # 2 batches left: the window cannot fill


# The keys a HybridLayer's checkpoint state (get_extra_state) carries for the health rules.
HEALTH_KEYS = ("reference_residual", "reference_kind", "health_window", "health_plain_run", "health_rebuilds")


def test_layer_checkpoint_keeps_the_health_keys_and_reads_older_states():
    """The rules' state is saved under the layer's keys of checkpoint format 2 and read back from
    them; a checkpoint older than the growth rule (a plain reference residual only) loads too."""
    _, layer = psi_walk(0.1, steps=1)
    state = layer.get_extra_state()
    assert {k for k in state if "health" in k or "reference" in k} == set(HEALTH_KEYS)
    saved = {
        "reference_residual": 1.25,
        "reference_kind": "view",
        "health_window": [(0.5, 0.4), (0.6, 0.4)],
        "health_plain_run": 1,
        "health_rebuilds": 4,
    }
    layer.set_extra_state({**state, **saved})
    h = layer.health
    assert (h.reference_residual, h.reference_kind, h.window, h.plain_run, h.rebuilds) == (
        1.25,
        "view",
        [[0.5, 0.4], [0.6, 0.4]],
        1,
        4,
    )
    assert layer.health_rebuilds == 4
    again = layer.get_extra_state()
    assert {k: again[k] for k in HEALTH_KEYS} == {**saved, "health_window": [[0.5, 0.4], [0.6, 0.4]]}
    older = {k: v for k, v in state.items() if k not in HEALTH_KEYS} | {"reference_residual": 0.3}
    layer.set_extra_state(older)
    assert (h.reference_residual, h.reference_kind, h.window, h.plain_run, h.rebuilds) == (0.3, "plain", [], 0, 0)
