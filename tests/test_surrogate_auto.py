"""``surrogate.rank: auto`` and ``integrator=auto``: the per-layer rules, their validation, and
that layers are built with the resolved values."""

from __future__ import annotations

import pytest
from conftest import REPO, run_cli

from astraora.build import build_model, hybrid_layers
from astraora.config import validate
from astraora.errors import ConfigError
from astraora.surrogate.auto import auto_rank, psi_queries, readout_rank, resolve_integrator, resolve_rank


@pytest.mark.parametrize(
    ("d_in", "d_out", "rank"),
    [
        (4, 4, 4),  # narrower than the floor: capped at min(n, m)
        (10, 3, 3),
        (40, 40, 10),  # floor
        (64, 64, 16),  # digits' MLP
        (128, 128, 32),  # the GPT's last MLP
        (512, 1024, 128),
        (6144, 192, 48),
    ],
)
def test_auto_rank_rule(d_in, d_out, rank):
    assert auto_rank(d_in, d_out) == rank
    assert resolve_rank("auto", d_in, d_out) == rank
    assert 1 <= rank <= min(d_in, d_out)


def test_integer_rank_is_kept():
    assert resolve_rank(10, 128, 128) == 10
    assert resolve_rank(7, 64, 32) == 7
    with pytest.raises(ConfigError, match=r"surrogate\.rank='big'"):
        resolve_rank("big", 8, 8)


def test_auto_integrator_picks_the_cheaper_update():
    spec = {"name": "auto", "samples": 100, "sketch": "gaussian", "reuse_sketch": False, "every": 2, "rebuild_every": 0}
    assert psi_queries(32, 100) == 264 and psi_queries(32, 100, reuse_sketch=True) == 164
    # 128 inputs: a readout (128 queries) beats 2r + 2·M_sm = 264
    assert resolve_integrator(spec, 128, 32) == {"name": "rebuild", "every": 2, "rebuild_every": 0}
    assert resolve_integrator(spec, 264, 32)["name"] == "rebuild"  # a tie goes to the exact readout
    wide = resolve_integrator(spec, 512, 128)  # 512 > 2·128 + 200 = 456
    assert wide == {**spec, "name": "psi_implicit"}
    # a fixed sketch is kept only where M_sm >= n, and then a readout (n <= M_sm queries) is cheaper
    # anyway: 200 inputs > M_sm, so psi_implicit would cost 264 > 200
    assert resolve_integrator({**spec, "reuse_sketch": True}, 200, 32)["name"] == "rebuild"
    assert resolve_integrator({**spec, "reuse_sketch": True}, 300, 32)["name"] == "psi_implicit"
    fixed = {"name": "psi_implicit", "samples": 100}
    assert resolve_integrator(fixed, 16, 4) == fixed  # not auto: unchanged


@pytest.mark.parametrize(("d_in", "rank"), [(512, 128), (1536, 384), (6144, 48)])
def test_auto_integrator_reads_out_where_the_estimate_takes_its_reading_from_the_readout(d_in, rank):
    """Colored differences reusing the readout would read A(θ) out themselves (d_in queries) after
    a psi_implicit update; a readout in its place makes the step cheaper at every size."""
    spec = {"name": "auto", "samples": 100, "sketch": "gaussian", "reuse_sketch": False, "every": 1, "rebuild_every": 0}
    assert resolve_integrator(spec, d_in, rank)["name"] == "psi_implicit"
    assert resolve_integrator(spec, d_in, rank, estimate_reuses_readout=True) == {
        "name": "rebuild",
        "every": 1,
        "rebuild_every": 0,
    }
    assert (
        resolve_integrator({**spec, "name": "psi_implicit"}, d_in, rank, estimate_reuses_readout=True)["name"]
        == "psi_implicit"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("zo", "integrator"),
    [
        (["zo=colored"], "rebuild"),  # reuses the readout
        (["zo=colored", "zo.reuse_readout=false"], "psi_implicit"),
        (["zo=colored", "zo.two_sided=true"], "psi_implicit"),  # reads no A(θ) of its own
        (["zo.direction=gaussian"], "psi_implicit"),
    ],
)
def test_layers_under_colored_differences_are_built_with_the_readout(make_cfg, zo, integrator):
    # 64 inputs, rank 16, M_sm = 10: a psi_implicit update (52 queries) is cheaper than a readout
    cfg = make_cfg("device=slm", "mode=zo+sm", "integrator=auto", "integrator.samples=10", *zo)
    validate(cfg)
    layers = hybrid_layers(build_model(cfg, {"num_classes": 10, "in_features": 64}))
    assert {layer.integrator.name for layer in layers.values()} == {integrator}


def test_readout_rank_full_keeps_the_whole_matrix_only_where_it_is_read_out():
    rebuild, psi = {"name": "rebuild", "every": 1}, {"name": "psi_implicit", "samples": 100}
    assert readout_rank("same", rebuild, 192, 32, auto_rank(192, 32)) == 10  # the default: the rule's rank
    assert readout_rank("full", rebuild, 192, 32, auto_rank(192, 32)) == 32
    assert readout_rank("full", rebuild, 64, 128, 7) == 64  # whatever `rank` says
    assert readout_rank("full", psi, 512, 1024, auto_rank(512, 1024)) == 128  # an implicit update: unchanged
    with pytest.raises(ConfigError, match=r"surrogate\.readout_rank"):
        readout_rank("all", rebuild, 8, 8, 2)


def test_layers_are_built_with_resolved_values(make_cfg):
    cfg = make_cfg("surrogate.rank=auto", "integrator=auto", "mode=zo+sm")
    validate(cfg)
    model = build_model(cfg, {"num_classes": 10, "in_features": 64})
    layers = hybrid_layers(model)
    assert layers
    for layer in layers.values():
        assert layer.surrogate.rank == auto_rank(layer.d_in, layer.d_out)
        assert layer.integrator.name == ("rebuild" if layer.d_in <= 2 * layer.surrogate.rank + 200 else "psi_implicit")
    full = hybrid_layers(
        build_model(make_cfg("surrogate.readout_rank=full", "mode=zo+sm"), {"num_classes": 10, "in_features": 64})
    )
    assert {(layer.surrogate.rank, layer.integrator.name) for layer in full.values()} == {
        (64, "rebuild")
    }  # 64 → 64, read out
    fixed = hybrid_layers(
        build_model(make_cfg("surrogate.rank=7", "integrator=psi_implicit"), {"num_classes": 10, "in_features": 64})
    )
    assert {layer.surrogate.rank for layer in fixed.values()} == {7}
    assert {layer.integrator.name for layer in fixed.values()} == {"psi_implicit"}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("surrogate.rank=big", "surrogate.rank"),
        ("surrogate.rank=0", "surrogate.rank"),
        ("integrator.name=sometimes", "integrator.name"),
        ("surrogate.readout_rank=all", "surrogate.readout_rank"),
    ],
)
def test_bad_values_name_the_key(make_cfg, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        validate(make_cfg(override))
    assert "\n" not in str(err.value)
    if key == "surrogate.rank":
        assert "'auto'" in str(err.value)
    elif key == "surrogate.readout_rank":
        assert "'same'" in str(err.value) and "'full'" in str(err.value)
    else:
        assert "'auto'" in str(err.value) and "psi_implicit" in str(err.value)


def test_auto_integrator_options_are_validated(make_cfg):
    with pytest.raises(ConfigError, match=r"integrator\.samples"):
        validate(make_cfg("integrator=auto", "integrator.samples=0"))


def test_bad_rank_exits_2_with_one_line(tmp_path):
    result = run_cli(["surrogate.rank=big", f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "surrogate.rank" in lines[0] and "auto" in lines[0]
