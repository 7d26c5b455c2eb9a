"""Colored finite differences (``zo=colored``): the VJP of an entry-wise device from one full
readout per column color, checked against the oracle, its query count, and its refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, random_batch

from astraora.config import validate
from astraora.devices import SLM, MatVec, MRRBank, MZIMesh
from astraora.devices.base import Device
from astraora.errors import ConfigError
from astraora.hybrid import HybridLayer
from astraora.ledger import QueryLedger
from astraora.train import run
from astraora.zo import ColoredEstimator

numeric = pytest.mark.usefixtures("float64")  # the gradient checks run in float64

ENTRYWISE = [SLM, MRRBank, MatVec]


def oracle_vjp(device, x, g) -> torch.Tensor:
    """∇_θ Σ_b ⟨A(θ) x_b, g_b⟩ by autograd through the simulator (crosstalk and drift included)."""
    theta = device.theta.detach().clone().requires_grad_(True)
    return torch.autograd.grad((device.simulate(x, theta) * g).sum(), theta)[0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@numeric
@pytest.mark.parametrize("cls", ENTRYWISE)
@pytest.mark.parametrize("two_sided", [False, True])
def test_matches_the_oracle_vjp(cls, two_sided):
    device = cls(7, 5, seed=3)
    x, g = random_batch(9, 7, 5)
    ghat = ColoredEstimator(mu=1e-6, two_sided=two_sided).estimate(QueryLedger(device), x, g)
    assert relative_error(ghat, oracle_vjp(device, x, g)) < (1e-8 if two_sided else 1e-4)


@numeric
@pytest.mark.parametrize("cls", [SLM, MRRBank])
@pytest.mark.parametrize("queries", ["all", "forward"])
def test_crosstalk_between_row_neighbours_takes_three_colors(cls, queries):
    """Each control also moves its row neighbours' entries; the three colors keep every entry's
    derivative apart (one color would add the neighbours' terms to each control)."""
    device = cls(8, 4, seed=1, nonideal={"crosstalk": 0.2, "queries": queries})
    assert device.jacobian_offsets() == (-1, 0, 1)
    x, g = random_batch(6, 8, 4, seed=2)
    ledger = QueryLedger(device)
    ghat = ColoredEstimator(mu=1e-6, two_sided=True).estimate(ledger, x, g)
    # queries=forward answers a ZO setting at effective(θ) + (θ' − θ): the perturbation skips the
    # crosstalk, so the reference is the VJP with the perturbation added after it
    if queries == "all":
        reference = oracle_vjp(device, x, g)
    else:
        delta = torch.zeros_like(device.theta, requires_grad=True)
        y = device.transfer(device.effective_theta(device.theta.detach().unsqueeze(0)) + delta, x)[0]
        reference = torch.autograd.grad((y * g).sum(), delta)[0]
    assert relative_error(ghat, reference) < 1e-8
    assert ledger.queries["zo"] == 2 * 3 * 8 and ledger.reprograms["zo"] == 6


@numeric
def test_query_count_is_colors_plus_one_readouts_whatever_the_batch():
    device = MRRBank(12, 3)
    estimator = ColoredEstimator()
    for batch in (2, 40):
        ledger = QueryLedger(device)
        x, g = random_batch(batch, 12, 3)
        estimator.estimate(ledger, x, g)
        assert ledger.queries["zo"] == estimator.queries_per_step(batch, 3, device) == 2 * 12
        assert ledger.reprograms["zo"] == 2 and estimator.last_samples == 2
    assert ColoredEstimator(two_sided=True).queries_per_step(5, 3, device) == 2 * 12


@numeric
def test_far_more_accurate_than_random_directions_for_fewer_queries():
    """What the option is for: at the default μ in float32-free arithmetic, the colored estimate is
    the VJP, where M = 100 random directions over p = 600 controls are about √(p/M) off."""
    from astraora.rng import make_generator
    from astraora.zo import ZOEstimator

    device = SLM(30, 20, seed=0)
    x, g = random_batch(32, 30, 20)
    exact = oracle_vjp(device, x, g)
    colored, gaussian = QueryLedger(device), QueryLedger(device)
    c = ColoredEstimator().estimate(colored, x, g)
    r = ZOEstimator(samples=100, generator=make_generator(0, "zo")).estimate(gaussian, x, g)
    assert relative_error(c, exact) < 1e-3 and relative_error(r, exact) > 1.0
    assert colored.queries["zo"] * 10 < gaussian.queries["zo"]


def test_meshes_and_undeclared_neighbours_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="zo.direction=colored.*MZIMesh.*zo=gaussian"):
        HybridLayer(MZIMesh(4, 4), zo=ColoredEstimator(), rank=2)

    class OwnNeighbours(SLM):
        def neighbour_sum(self, theta):
            return Device.neighbour_sum(self, theta).roll(1, dims=-2)

    assert OwnNeighbours(4, 4, nonideal={"crosstalk": 0.1}).jacobian_offsets() is None
    assert OwnNeighbours(4, 4).jacobian_offsets() == (0,)
    with pytest.raises(ConfigError, match="OwnNeighbours declares no such structure"):
        HybridLayer(OwnNeighbours(4, 4, nonideal={"crosstalk": 0.1}), zo=ColoredEstimator(), rank=2)


def test_config_refuses_random_direction_options_naming_them():
    validate(compose_config(["device=slm", "zo=colored"]))
    validate(compose_config(["device=slm", "zo.direction=colored", "zo.samples=10"]))  # unused, accepted
    with pytest.raises(ConfigError, match=r"zo.spread=True is not allowed; not a key of the zo group"):
        validate(compose_config(["device=slm", "zo.direction=colored", "+zo.spread=true"]))
    gaussian_instead = r"zo.every=2: not available with zo.direction=colored.*use zo.direction=gaussian"
    with pytest.raises(ConfigError, match=gaussian_instead):
        validate(compose_config(["device=slm", "zo=colored", "+zo.every=2"]))
    with pytest.raises(ConfigError, match=r"zo.direction='coloured' is not allowed.*'colored'"):
        validate(compose_config(["device=slm", "zo.direction=coloured"]))
    with pytest.raises(ConfigError, match="zo.mu=0"):
        validate(compose_config(["device=slm", "zo=colored", "zo.mu=0"]))
    with pytest.raises(ConfigError, match="zo.every=3: not available with zo.direction=colored"):
        ColoredEstimator(every=3)
    with pytest.raises(ConfigError, match="zo.spread=3 is not allowed; not a key of the zo group"):
        ColoredEstimator(spread=3)
    with pytest.raises(ConfigError, match=r"zo.reuse_readout='yes'.* true or false"):
        validate(compose_config(["device=slm", "zo=colored", "zo.reuse_readout=yes"]))
    with pytest.raises(ConfigError, match=r"zo.reuse_readout=True: only with zo.direction=colored.*'gaussian'"):
        validate(compose_config(["device=mzi", "+zo.reuse_readout=true"]))


def test_training_run_with_colored_differences(tmp_path):
    cfg = compose_config(["debug=fast", "device=mrr", "zo=colored"], tmp_path / "run")
    summary = run(cfg)
    assert summary["status"] == "completed"
    assert summary["config"]["zo"] == {"samples": None, "direction": "colored", "two_sided": False}
    # digits' MLP: one physical layer of n = 64 inputs, 3 steps, one color: 2 readings per step, the
    # reading of A(θ) taken from the surrogate's readout (debug=fast's M_sm = 4 would make a
    # psi_implicit update cheaper than a readout, but not cheaper than a readout the estimate reuses)
    assert summary["queries"]["zo"] == 3 * 64


@numeric
@pytest.mark.parametrize(
    "device",
    [SLM(7, 5, seed=3), MRRBank(7, 5, seed=1), MatVec(8, 4, seed=2, nonideal={"crosstalk": 0.2})],
    ids=["slm", "mrr", "matvec-crosstalk"],
)
def test_reuses_the_ledgers_readout_at_the_same_theta(device):
    """After a full readout at the live θ the estimate reads only the k perturbed settings, and
    its value is the one it gets when it reads A(θ) itself."""
    x, g = random_batch(9, device.d_in, device.d_out)
    k = ColoredEstimator.colors(device.jacobian_offsets())
    fresh = QueryLedger(device)
    expected = ColoredEstimator(reuse_readout=False).estimate(fresh, x, g)
    ledger = QueryLedger(device, keep_readings=True)
    ledger.read_matrix("readout")
    estimator = ColoredEstimator()
    assert torch.equal(estimator.estimate(ledger, x, g), expected)
    assert ledger.queries["zo"] == k * device.d_in and estimator.last_samples == k
    assert ledger.queries["readout"] == device.d_in and fresh.queries["zo"] == (k + 1) * device.d_in
    # two-sided differences need no reading at θ: nothing to reuse
    two = QueryLedger(device, keep_readings=True)
    two.read_matrix("readout")
    ColoredEstimator(two_sided=True).estimate(two, x, g)
    assert two.queries["zo"] == 2 * k * device.d_in


@numeric
def test_a_reading_is_not_reused_once_theta_or_drift_moved_or_after_reuse_readout_false():
    device = SLM(6, 4, seed=0, nonideal={"drift_std": 0.01})
    x, g = random_batch(5, 6, 4)
    ledger = QueryLedger(device, keep_readings=True)
    ledger.read_matrix("readout")
    assert ledger.reading_at(device.theta, "zo") is not None
    ColoredEstimator(reuse_readout=False).estimate(ledger, x, g)
    assert ledger.queries["zo"] == 2 * 6  # told not to
    ledger.step_drift()  # the chip moved under the same θ: the reading is stale
    assert ledger.reading_at(device.theta, "zo") is None
    ColoredEstimator().estimate(ledger, x, g)
    assert ledger.queries["zo"] == 2 * 2 * 6
    ledger.read_matrix("readout")
    with torch.no_grad():
        device.theta.add_(1e-3)  # an optimizer step
    assert ledger.reading_at(device.theta, "zo") is None
    # the decision is the trainer's, from what the device declares, never from its drift itself: a
    # device that declares none keeps its reading over a drift step; one that does not say loses it
    still = SLM(6, 4, seed=0)
    still_ledger = QueryLedger(still, keep_readings=True)
    still_ledger.read_matrix("readout")
    still_ledger.step_drift()
    assert still_ledger.reading_at(still.theta, "zo") is not None

    class Undeclared(SLM):
        drifts = None  # a driver that does not say whether its chip drifts

    quiet = QueryLedger(Undeclared(6, 4, seed=0), keep_readings=True)
    quiet.read_matrix("readout")
    quiet.step_drift()
    assert quiet.reading_at(quiet.device.theta, "zo") is None
    # a reading kept in a checkpoint is one after the restore
    ledger.read_matrix("readout")
    restored = QueryLedger(device, keep_readings=True)
    restored.load_state_dict(ledger.state_dict())
    assert torch.equal(restored.reading_at(device.theta, "zo"), ledger.reading_at(device.theta, "zo"))


@numeric
def test_a_reading_of_the_ideal_device_is_not_reused_for_a_query_that_sees_the_noise():
    """With queries=forward only the forward pass sees the noise: a reading taken for the forward
    pass is no ZO reading (none is made that way today, but the ledger must not mix them)."""
    device = SLM(6, 4, seed=0, nonideal={"output_noise": 0.01, "queries": "forward"})
    ledger = QueryLedger(device, keep_readings=True)
    ledger.read_matrix("forward")
    assert ledger.reading_at(device.theta, "zo") is None and ledger.reading_at(device.theta, "forward") is not None
    ledger.read_matrix("readout")
    assert ledger.reading_at(device.theta, "zo") is not None


def test_training_reuses_the_auto_integrators_readouts_and_changes_nothing_else(tmp_path):
    """With the auto integrator's full readout after every θ-update, each estimate reads only its
    perturbed settings; the noise-free run is the same run as without reuse, for half the ZO queries."""
    base = ["debug=fast", "device=slm", "zo=colored", "integrator.samples=100", "trainer.limit_val_batches=0"]
    reused = run(compose_config(base, tmp_path / "reused"))
    again = run(compose_config([*base, "zo.reuse_readout=false"], tmp_path / "again"))
    assert reused["queries"]["zo"] == 3 * 64 and again["queries"]["zo"] == 3 * 2 * 64
    assert reused["queries"]["readout"] == again["queries"]["readout"] == 4 * 64  # init + after each step
    assert reused["metrics"] == again["metrics"]


def test_auto_integrators_readout_makes_the_step_cheaper_than_psi_implicit(tmp_path):
    """Where psi_implicit's update (2r + 2·M_sm = 52) costs fewer queries than a readout (64), the
    estimate would still read A(θ) out itself after it (64): `auto` reads out instead, and the
    whole run costs fewer queries than the same run forced onto psi_implicit."""
    base = ["debug=fast", "device=slm", "zo=colored", "integrator.samples=10", "trainer.limit_val_batches=0"]
    auto = run(compose_config(base, tmp_path / "auto"))
    psi = run(compose_config([*base, "integrator=psi_implicit", "integrator.samples=10"], tmp_path / "psi"))
    # psi_implicit: only the first estimate finds a readout (the surrogate's initial one)
    assert psi["queries"]["zo"] == (3 * 2 - 1) * 64 and auto["queries"]["zo"] == 3 * 64
    assert auto["queries"]["readout"] == 4 * 64
    assert sum(auto["queries"].values()) < sum(psi["queries"].values())


@numeric
def test_data_parallel_mean_of_shard_estimates_is_the_batch_estimate():
    """Each process estimates from its shard (its g is that of the shard's mean loss, twice the
    whole batch's for two shards); the reducer's mean is the whole batch's estimate."""
    device = SLM(6, 4, seed=2)
    x, g = random_batch(8, 6, 4)
    whole = ColoredEstimator().estimate(QueryLedger(device), x, g)
    other = ColoredEstimator().estimate(QueryLedger(device), x[4:], 2 * g[4:])
    estimator = ColoredEstimator()
    estimator.reducer = lambda t: (t + other) / 2  # what RankSync.mean gives with two processes
    assert torch.allclose(estimator.estimate(QueryLedger(device), x[:4], 2 * g[:4]), whole, atol=1e-9)


def test_only_a_layer_that_reuses_readouts_keeps_one():
    """The last readout (an m × n matrix, checkpointed) is kept only where colored differences
    will reuse it; a layer with random directions or two-sided differences keeps none."""
    from astraora.rng import make_generator
    from astraora.zo import ZOEstimator

    x = torch.randn(8, 6)
    for zo, kept in (
        (ColoredEstimator(), True),
        (ColoredEstimator(two_sided=True), False),
        (ColoredEstimator(reuse_readout=False), False),
        (ZOEstimator(samples=4, generator=make_generator(0, "zo")), False),
    ):
        layer = HybridLayer(SLM(6, 4, seed=0), zo=zo, rank=2, integrator={"name": "rebuild"})
        layer.train()
        layer(x)  # the initial readout
        assert layer.ledger.keep_readings is kept
        assert (layer.ledger.state_dict()["reading"] is not None) is kept


def test_colored_differences_warn_where_random_directions_are_cheaper(caplog):
    """(k + 1)·n per step against M·min(B, m) + 2r + 2·M_sm: a wide SLM layer is cheaper with the
    paper's random directions, a narrow one with colored differences; the build says which."""
    from conftest import compose_config

    from astraora.build import colored_crossover, make_layer_factory

    factory = make_layer_factory(compose_config(["device=slm", "task.datamodule.batch_size=32"]))
    with caplog.at_level("WARNING", logger="astraora"):
        narrow = factory(64, 10, "narrow")
    assert not caplog.records
    assert colored_crossover(narrow.zo, narrow.device, 32, 10) == (2 * 64, 100 * 10 + 2 * 10 + 2 * 100)
    with caplog.at_level("WARNING", logger="astraora"):
        wide = factory(2048, 64, "wide")
    assert colored_crossover(wide.zo, wide.device, 32, 16) == (2 * 2048, 100 * 32 + 2 * 16 + 2 * 100)
    assert len(caplog.records) == 1 and "zo=gaussian is the cheaper estimate" in caplog.text and "4096" in caplog.text
