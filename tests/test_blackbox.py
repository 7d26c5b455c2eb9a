"""The black box stays black: in ``zo+sm`` (and on the θ side of ``zo+exact``) training touches a
device only through its ledger's queries. Every device × estimator × integrator trains a few
steps with diagnostics off while the simulator's internals (true matrix, transfer function, drift,
generators) are watched: no access outside the ledger's query path, and the oracle count stays 0."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import compose_config

from astraora.build import make_layer_factory
from astraora.ledger import QueryLedger

# What only a simulator has: reading any of it from training code would be cheating on hardware.
INTERNALS = (
    "matrix",
    "simulate",
    "transfer",
    "settings_for",
    "effective_theta",
    "drift",
    "noise_gen",
    "drift_gen",
    "fault_gen",
)
DEVICES = {"mzi": [], "mzi_classical": [], "mrr": [], "slm": [], "monarch": [], "matvec": []}
ENTRYWISE = ("mrr", "slm", "matvec")
ESTIMATORS = ("gaussian", "rademacher", "sphere", "colored")
INTEGRATORS = ("auto", "psi_implicit", "rebuild", "frozen")
NOISY = ["device.nonideal.output_noise=0.01", "device.nonideal.drift_std=1e-3"]


class Watch:
    """Records accesses to a device's internals made outside the ledger's query path."""

    def __init__(self, monkeypatch):
        self.inside, self.seen = 0, []
        for method in ("_send", "step_drift"):
            original = getattr(QueryLedger, method)
            monkeypatch.setattr(QueryLedger, method, self._inside(original))

    def _inside(self, fn):
        def wrapped(*args, **kwargs):
            self.inside += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside -= 1

        return wrapped

    def device(self, device):
        """``device`` with every attribute access checked (its class swapped for a watching subclass)."""
        watch, base = self, type(device)

        def __getattribute__(obj, name):
            if name in INTERNALS and not watch.inside:
                watch.seen.append(name)
            return base.__getattribute__(obj, name)

        device.__class__ = type(f"Watched{base.__name__}", (base,), {"__getattribute__": __getattribute__})
        return device


def train_a_few_steps(layer, steps: int = 3) -> None:
    """What the trainer does per step: forward, backward, an optimizer step on θ, the layer's update."""
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD([layer.theta], lr=1e-2)
    for _ in range(steps):
        x = torch.randn(5, layer.d_in, generator=gen, requires_grad=True)
        g = torch.randn(5, layer.d_out, generator=gen)
        optimizer.zero_grad()
        (layer(x) * g).sum().backward()
        optimizer.step()
        layer.after_optimizer_step()


def combinations():
    """Every device × estimator × integrator; the quick suite runs every device with every estimator
    (under psi_implicit, which keeps readings across steps) and every integrator on a mesh and an
    entry-wise device, the slow tier the rest."""
    for device, zo, integrator in itertools.product(DEVICES, ESTIMATORS, INTEGRATORS):
        if zo == "colored" and device not in ENTRYWISE:
            continue  # colored differences need one control per matrix entry (refused elsewhere)
        quick = integrator == "psi_implicit" or (device in ("mzi", "slm") and zo in ("gaussian", "colored"))
        yield pytest.param(device, zo, integrator, marks=() if quick else pytest.mark.slow)


@pytest.mark.slow
@pytest.mark.parametrize("device,zo,integrator", list(combinations()))
def test_zo_sm_touches_the_device_only_through_its_queries(monkeypatch, device, zo, integrator):
    watch = Watch(monkeypatch)
    sizes = {"auto": ["integrator.samples=4"], "psi_implicit": ["integrator.samples=8", "integrator.reuse_sketch=true"]}
    sizes = sizes.get(integrator, []) + ([] if zo == "colored" else ["zo.samples=4"])  # a kept sketch: M_sm >= n
    cfg = compose_config(
        [f"device={device}", f"zo={zo}", f"integrator={integrator}", "mode=zo+sm", *sizes, "surrogate.rank=2", *NOISY]
    )
    layer = make_layer_factory(cfg)(6, 4, "head.physical")
    watch.device(layer.device)
    train_a_few_steps(layer)
    assert layer.ledger.oracle == 0
    assert not watch.seen, f"training read the simulator's {sorted(set(watch.seen))} outside the ledger"
    assert layer.ledger.queries["zo"] > 0


@pytest.mark.parametrize("device", list(DEVICES))
def test_zo_exact_estimates_theta_from_queries_only(monkeypatch, device):
    """zo+exact takes the input gradient from the oracle (that is the mode); the θ estimate must not."""
    watch = Watch(monkeypatch)
    cfg = compose_config([f"device={device}", "mode=zo+exact", "zo.samples=4", *NOISY])
    layer = make_layer_factory(cfg)(6, 4, "head.physical")
    watch.device(layer.device)
    input_grad = layer.input_grad

    def oracle_input_grad(x, g):  # the mode's own oracle use, not watched
        watch.inside += 1
        try:
            return input_grad(x, g)
        finally:
            watch.inside -= 1

    layer.input_grad = oracle_input_grad
    estimate, oracle_during_estimates = layer.zo.estimate, []

    def counted(ledger, *args, **kwargs):
        before = ledger.oracle
        out = estimate(ledger, *args, **kwargs)
        oracle_during_estimates.append(ledger.oracle - before)
        return out

    layer.zo.estimate = counted
    train_a_few_steps(layer)
    assert oracle_during_estimates == [0, 0, 0]
    assert not watch.seen, f"the θ side read the simulator's {sorted(set(watch.seen))}"


def test_the_watch_sees_a_cheating_estimator(monkeypatch):
    """The guard itself: an estimator that also reads the true A(θ) (while still making and counting
    its queries) is caught, through the oracle counter and through the watched attributes."""
    watch = Watch(monkeypatch)
    cfg = compose_config(["device=slm", "zo=colored", "mode=zo+sm", "surrogate.rank=2", *NOISY])
    layer = make_layer_factory(cfg)(6, 4, "head.physical")
    watch.device(layer.device)
    estimate = layer.zo.estimate

    def cheating(ledger, *args, **kwargs):
        ledger.device.matrix()  # peeks at the truth, then estimates as usual
        return estimate(ledger, *args, **kwargs)

    layer.zo.estimate = cheating
    train_a_few_steps(layer, steps=1)
    assert "matrix" in watch.seen
