"""Query-efficiency options (docs/ALGORITHM.md §9): each one's ledger count equals its formula, and
its estimate is what it claims (unbiased, or E[ĝ] = Σ∇φ for the guided subspace), independent of
chunking and reproducible from a saved generator state (the data-parallel redraw)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, random_batch

from astraora.config import validate
from astraora.devices import MatVec, MZIMesh
from astraora.errors import ConfigError
from astraora.hybrid import HybridLayer
from astraora.ledger import QueryLedger
from astraora.rng import make_generator
from astraora.surrogate import LowRankSurrogate, make_integrator
from astraora.zo import ZOEstimator

OPTIONS = {
    "orthogonal": dict(orthogonal=True),
    "orthogonal_sphere": dict(orthogonal=True, direction="sphere"),
    "antithetic": dict(antithetic=True),
    "guided": dict(guided_k=3, guided_weight=0.5),
    "blocks": dict(blocks=4),
    "adaptive": dict(adaptive_rse=0.9, min_samples=4),
}


pytestmark = pytest.mark.usefixtures("float64")


def zo_estimator(samples=12, seed=0, **kwargs) -> ZOEstimator:
    return ZOEstimator(samples=samples, generator=make_generator(seed, "zo"), **kwargs)


data = random_batch


def linear_gradient(device: MatVec, x, g):
    """For the MatVec device A(θ) = θ, φ is linear and ∇_θ φ = Gᵀ X exactly."""
    return g.T @ x


# --------------------------------------------------------------------------- ledger = formula
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("batch", [3, 9])  # B <= m and B > m (m = 5)
@pytest.mark.parametrize("reuse_forward", [True, False])
def test_ledger_counts_equal_each_options_formula(option, batch, reuse_forward):
    n, m, M = 6, 5, 12
    device = MZIMesh(n, m, seed=0, name="d")
    zo = zo_estimator(M, reuse_forward=reuse_forward, **OPTIONS[option])
    ledger = QueryLedger(device)
    x, g = data(batch, n, m)
    y = ledger.query(x, "forward")
    for _ in range(3):  # guided uses the earlier estimates from the second one on
        before = ledger.queries["zo"]
        zo.estimate(ledger, x, g, y)
        q = min(batch, m)
        used = zo.last_samples
        requery = 0 if (option == "antithetic" or (reuse_forward and device.forward_output_gives_phi(batch > m))) else 1
        assert (
            ledger.queries["zo"] - before == q * (used + requery) == zo.queries_per_step(batch, m, device, samples=used)
        )
        if option == "adaptive":
            assert used % 4 == 0 and 4 <= used <= M
        else:
            assert used == M


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


# --------------------------------------------------------------------------- estimates
@pytest.mark.parametrize("option", ["orthogonal", "orthogonal_sphere", "antithetic", "blocks"])
def test_unbiased_options_average_to_the_true_gradient(option):
    """On a linear φ each estimate is (1/M) Σ u uᵀ ∇φ exactly; over many estimates the mean is
    ∇φ within a few standard errors."""
    n, m, batch, M, trials = 4, 3, 2, 6, 3000
    device = MatVec(n, m, seed=0, name="d")
    ledger = QueryLedger(device)
    x, g = data(batch, n, m)
    truth = linear_gradient(device, x, g)
    zo = zo_estimator(M, mu=1e-3, **OPTIONS[option])
    estimates = torch.stack([zo.estimate(ledger, x, g) for _ in range(trials)])
    mean, se = estimates.mean(0), estimates.std(0) / trials**0.5
    assert ((mean - truth).abs() <= 5 * se + 1e-9).all(), (mean - truth).abs().max()


def test_guided_subspace_estimates_sigma_times_the_gradient():
    """E[ĝ] = Σ ∇φ with Σ = (1 − w) I + w (p/k) Q Qᵀ, Q the span of the remembered estimates."""
    n, m, batch, M, trials, w = 4, 3, 2, 6, 3000, 0.6
    device = MatVec(n, m, seed=0, name="d")
    ledger = QueryLedger(device)
    x, g = data(batch, n, m)
    truth = linear_gradient(device, x, g).reshape(-1)
    p = truth.numel()
    zo = zo_estimator(M, mu=1e-3, guided_k=2, guided_weight=w)
    guide = [torch.randn(p, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    Q = torch.linalg.qr(torch.stack(guide, 1))[0]
    sigma = (1 - w) * torch.eye(p) + w * (p / 2) * Q @ Q.T
    estimates = []
    for _ in range(trials):
        zo.history = list(guide)  # the same subspace every trial
        estimates.append(zo.estimate(ledger, x, g).reshape(-1))
    estimates = torch.stack(estimates)
    mean, se = estimates.mean(0), estimates.std(0) / trials**0.5
    assert ((mean - sigma @ truth).abs() <= 5 * se + 1e-9).all()
    # the subspace term is what it is: with a guide along ∇φ the estimate's cosine improves
    zo.history = [truth.clone()]
    guided = torch.nn.functional.cosine_similarity(zo.estimate(ledger, x, g).reshape(-1), truth, dim=0)
    assert guided > 0.5


def test_variance_figures_orthogonal_and_antithetic():
    """Variance figures (E‖ĝ − ∇φ‖² / ‖∇φ‖², linear φ, p = 12): i.i.d. Gaussian (p + 1)/M; orthogonal
    sphere directions (p − M)/M, zero at M = p; orthogonal Gaussian lengths in between."""
    n, m, batch, trials = 4, 3, 2, 400
    device = MatVec(n, m, seed=0, name="d")
    ledger = QueryLedger(device)
    x, g = data(batch, n, m)
    truth = linear_gradient(device, x, g)
    p = truth.numel()

    def relative_variance(M, **kwargs):
        zo = zo_estimator(M, mu=1e-3, **kwargs)
        err = torch.stack([(zo.estimate(ledger, x, g) - truth).square().sum() for _ in range(trials)])
        return float(err.mean() / truth.square().sum())

    figures = {
        "iid M=6": relative_variance(6),
        "orthogonal M=6": relative_variance(6, orthogonal=True),
        "orthogonal sphere M=6": relative_variance(6, orthogonal=True, direction="sphere"),
        "orthogonal sphere M=p": relative_variance(p, orthogonal=True, direction="sphere"),
    }
    print(figures)
    assert figures["iid M=6"] == pytest.approx((p + 1) / 6, rel=0.25)
    assert figures["orthogonal sphere M=6"] == pytest.approx((p - 6) / 6, rel=0.25)
    assert figures["orthogonal sphere M=p"] < 1e-10
    assert figures["orthogonal M=6"] < figures["iid M=6"]


def test_antithetic_pairs_equal_central_differences_with_half_the_directions():
    n, m, batch = 6, 5, 3
    x, g = data(batch, n, m)
    a_dev, b_dev = MZIMesh(n, m, seed=0, name="d"), MZIMesh(n, m, seed=0, name="d")
    a_led, b_led = QueryLedger(a_dev), QueryLedger(b_dev)
    anti = zo_estimator(10, antithetic=True, reuse_forward=False).estimate(a_led, x, g)
    central = zo_estimator(5, two_sided=True).estimate(b_led, x, g)
    assert torch.allclose(anti, central, rtol=1e-8, atol=1e-10)
    assert a_led.queries["zo"] == b_led.queries["zo"] == 10 * batch  # no φ(θ) query


@pytest.mark.parametrize("option", list(OPTIONS))
def test_options_are_independent_of_chunking_and_of_the_redraw(option):
    """The same estimate for any chunk size, and with a reducer (the data-parallel path: measure,
    reduce, restore the generator, redraw the same directions)."""
    n, m, batch, M = 6, 5, 3, 12
    x, g = data(batch, n, m)
    history = [torch.randn(30, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    results = []
    for chunk, reducer in (("auto", None), (3, None), (5, lambda t: t.clone()), ("auto", lambda t: t.clone())):
        device = MZIMesh(n, m, seed=0, name="d")
        zo = zo_estimator(M, chunk_size=chunk, **OPTIONS[option])
        zo.reducer = reducer
        if zo.guided_k:
            zo.history = list(history)
        results.append((zo.estimate(QueryLedger(device), x, g), zo.last_samples))
    for ghat, used in results[1:]:
        assert used == results[0][1]
        assert torch.allclose(ghat, results[0][0], rtol=1e-10, atol=1e-12)


def test_guided_history_and_every_counter_are_checkpointed():
    n, m, batch = 6, 5, 3
    x, g = data(batch, n, m)
    led = QueryLedger(MZIMesh(n, m, seed=0, name="d"))
    zo = zo_estimator(6, guided_k=2, every=2, between="last")
    for _ in range(3):
        zo.estimate(led, x, g)
    twin = zo_estimator(6, seed=5, guided_k=2, every=2, between="last")
    twin.load_state_dict(zo.state_dict())
    assert torch.equal(zo.estimate(led, x, g), twin.estimate(led, x, g))  # call 4: the last estimate
    assert torch.equal(zo.estimate(led, x, g), twin.estimate(led, x, g))  # call 5: a new guided one


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
        ("zo.guided_weight=1.5", "zo.guided_weight"),
        ("zo.blocks=0", "zo.blocks"),
        ("zo.orthogonal=maybe", "zo.orthogonal"),
        ("zo.adaptive_rse=-1", "zo.adaptive_rse"),
        ("integrator.reuse_sketch=often", "integrator.reuse_sketch"),
    ],
)
def test_bad_query_option_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config([override]), import_targets=False)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(samples=5, antithetic=True), "zo.samples"),
        (dict(orthogonal=True, direction="rademacher"), "zo.orthogonal"),
        (dict(antithetic=True, two_sided=True), "zo.antithetic"),
        (dict(blocks=2, orthogonal=True), "zo.blocks"),
        (dict(samples=8, adaptive_rse=0.5, min_samples=9), "zo.min_samples"),
    ],
)
def test_bad_option_combinations_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ZOEstimator(generator=make_generator(0, "zo"), **kwargs)


def test_query_efficient_preset_sets_only_method_keys():
    cfg = compose_config(["experiment=query_efficient", "task=synthetic_audio", "device=mrr"])
    assert cfg.task.name == "synthetic_audio" and cfg.device.family == "mrr"
    validate(cfg, import_targets=False)
    plain = compose_config(["task=synthetic_audio", "device=mrr"])
    assert (cfg.zo.samples, cfg.zo.every, cfg.zo.between) == (50, 2, "momentum")
    assert cfg.task == plain.task and cfg.device == plain.device and cfg.integrator == plain.integrator
    assert {k: v for k, v in cfg.zo.items() if k not in ("samples", "every", "between")} == {
        k: v for k, v in plain.zo.items() if k not in ("samples", "every", "between")
    }


# --------------------------------------------------------------------------- study report
def test_query_study_table_and_plot_from_summaries(tmp_path):
    import json

    from astraora.report.query_study import main

    def summary(task, variant, seed, acc, total):
        d = tmp_path / "runs" / task / variant / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(
            json.dumps(
                {
                    "status": "completed",
                    "metrics": {"test/acc": acc},
                    "queries": {"total": total, "zo": total - 10, "surrogate": 5},
                }
            )
        )

    summary("digits", "paper", 0, 0.90, 1000)
    summary("digits", "paper", 1, 0.92, 1000)
    summary("digits", "query_efficient", 0, 0.905, 250)
    summary("digits", "query_efficient", 1, 0.915, 250)
    summary("digits", "query_efficient", 5, 0.0, 250)  # not among the reported seeds
    assert main(["--report-only", "--seeds", "0", "1", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "query_study.md").read_text()
    assert "| query_efficient | 2 | 91.00 ± 0.71 | 250 | 0.250 | +0.00 ± 0.50 |" in table  # paired +0.5, −0.5 pt
    assert (tmp_path / "query_study.png").stat().st_size > 0
    assert main(["--report-only", "--out", str(tmp_path / "empty")]) == 2


def test_query_study_image_folder_runs_on_the_generated_folder(tmp_path):
    from astraora.report.query_study import command, image_root, run_dir

    directory = run_dir(tmp_path, "image_folder", "query_efficient", 3)
    cmd = command("image_folder", "query_efficient", 3, directory)
    assert f"task.root={image_root(tmp_path)}" in cmd and "experiment=query_efficient" in cmd and "seed=3" in cmd
    assert not any(
        arg.startswith("task.root") for arg in command("digits", "paper", 0, run_dir(tmp_path, "digits", "paper", 0))
    )
