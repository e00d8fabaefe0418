"""Local-training strategies (fednode.strategies) and server steps (orchestrator.server_step).

Each algorithm's defining property is checked against a hand computation on a
tiny model (Linear(4, 3), flat layout ``[weight (12), bias (3)]``).
"""
from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import torch.nn.functional as F

from fednode.strategies import STRATEGIES, FedProx, build_config, build_strategy, restricted_logits
from fednode.strategies.fedrs import class_counts
from fednode.training import TrainConfig, batches, train_local
from orchestrator.server_step import (SERVER_STEPS, FedDynStep, SgdStep, build_server_step, parameter_mask,
                                      server_step_for_algorithm)
from proto.layout import Layout

NAMES = sorted(STRATEGIES)


pytestmark = pytest.mark.usefixtures("one_thread")


# -- helpers ---------------------------------------------------------------------------------------
def linear(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def mlp_bn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3))


def data(n: int = 16, seed: int = 1, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, classes, (n,), generator=g)


def flat(model: torch.nn.Module) -> tuple[Layout, torch.Tensor]:
    layout = Layout.from_module(model)
    return layout, layout.flatten(model.state_dict()).clone()


def run(name: str, params: dict | None = None, *, model=None, x=None, y=None, state=None, lr=0.1, epochs=1,
        batch_size=64, seed=0, num_classes=3, strategy=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(delta, global_vec, state) of one local round; full-batch by default."""
    model = model if model is not None else linear()
    if x is None:
        x, y = data()
    layout, g = flat(model)
    state = {} if state is None else state
    config = TrainConfig(algorithm=name, epochs=epochs, batch_size=batch_size, lr=lr, params=params or {})
    gen = torch.Generator().manual_seed(seed)
    if strategy is None:
        delta = train_local(model, layout, g, x, y, config, gen, state, num_classes)
    else:
        delta = strategy.train(model, layout, g, x, y, config, gen, state, num_classes)
    return delta, g, state


def lin_loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    logits = x @ w[:12].view(3, 4).T + w[12:]
    return F.cross_entropy(logits if scale is None else logits * scale, y)


def lin_grad(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    w = w.detach().clone().requires_grad_(True)
    lin_loss(w, x, y, scale).backward()
    return w.grad


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# -- registry ----------------------------------------------------------------------------------------
def test_registry_names_and_server_steps():
    assert NAMES == ["fedavg", "feddyn", "fedprox", "fedrs", "fedsam", "fedspeed"]
    for name, (config_cls, strategy_cls) in STRATEGIES.items():
        assert dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen
        assert strategy_cls.name == name
        assert strategy_cls.server_step in SERVER_STEPS
        assert strategy_cls.server_step == ("feddyn" if name == "feddyn" else "sgd")
        assert strategy_cls.stateful == (name in ("feddyn", "fedspeed"))
        config = build_config(name)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(config, "x", 1)
        if dataclasses.fields(config_cls):
            with pytest.raises(TypeError):  # keyword-only
                config_cls(1.0)


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown algorithm 'fedfoo'; known: fedavg, feddyn, fedprox, fedrs, fedsam, fedspeed"):
        build_strategy("fedfoo")
    with pytest.raises(ValueError, match=r"'rho'.*allowed: mu"):
        build_strategy("fedprox", {"rho": 0.1})
    with pytest.raises(ValueError, match=r"'mu'.*allowed: \(none\)"):
        build_strategy("fedavg", {"mu": 0.1})
    with pytest.raises(ValueError, match=r"'lr'.*allowed: alpha, lam, lambda, rho"):
        build_strategy("fedspeed", {"lr": 0.1})
    with pytest.raises(ValueError, match="unknown algorithm"):
        run("fedfoo")
    for name, params in [("fedprox", {"mu": -1}), ("fedprox", {"mu": "big"}), ("feddyn", {"alpha": 0}),
                         ("fedrs", {"alpha": 0.0}), ("fedrs", {"alpha": 1.5}), ("fedsam", {"rho": -0.1}),
                         ("fedspeed", {"lambda": 0}), ("fedspeed", {"alpha": 2}), ("fedprox", {"mu": float("nan")})]:
        with pytest.raises(ValueError):
            build_strategy(name, params)


def test_fedspeed_lambda_alias():
    assert build_strategy("fedspeed", {"lambda": 2}).config.lam == 2.0
    assert build_strategy("fedspeed", {"lam": 3.0}).config.lam == 3.0
    with pytest.raises(ValueError, match="given twice"):
        build_strategy("fedspeed", {"lam": 1.0, "lambda": 2.0})


def test_params_are_coerced_to_float():
    assert build_strategy("fedprox", {"mu": 1}).config.mu == 1.0
    assert isinstance(build_strategy("fedprox", {"mu": 1}).config.mu, float)


# -- contract over every strategy -----------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_finite_delta_deterministic_and_global_untouched(name):
    x, y = data(40)
    outs = []
    for _ in range(2):
        state: dict = {}
        for round_ in range(2):  # second round exercises the stored state
            delta, g, state = run(name, model=mlp_bn(), x=x, y=y, state=state, batch_size=8, epochs=2, seed=round_)
        g_copy = g.clone()
        assert delta.dtype == torch.float32 and delta.shape == (Layout.from_module(mlp_bn()).d,)
        assert torch.isfinite(delta).all() and delta.abs().sum() > 0
        assert torch.equal(g, g_copy)
        assert all(isinstance(v, torch.Tensor) and torch.isfinite(v).all() for v in state.values())
        outs.append((delta, state))
    assert torch.equal(outs[0][0], outs[1][0])
    assert outs[0][1].keys() == outs[1][1].keys()
    assert all(torch.equal(outs[0][1][k], outs[1][1][k]) for k in outs[0][1])


def test_fedavg_is_the_plain_sgd_loop():
    x, y = data(30)
    config = TrainConfig(epochs=2, batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-3)
    delta = train_local(mlp_bn(), *flat(mlp_bn()), x, y, config, torch.Generator().manual_seed(3))
    # the loop as it was before strategies existed
    model = mlp_bn()
    layout, g = flat(model)
    gen = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for _ in range(2):
        for xb, yb in batches(x, y, 8, gen):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    assert torch.equal(delta, layout.flatten(model.state_dict()) - g)


@pytest.mark.parametrize("name", ["feddyn", "fedspeed"])
def test_stateful_strategies_need_a_state_dict(name):
    model = linear()
    layout, g = flat(model)
    x, y = data()
    with pytest.raises(ValueError, match="state"):
        train_local(model, layout, g, x, y, TrainConfig(algorithm=name), torch.Generator(), None, 3)
    with pytest.raises(ValueError, match="shape"):
        run(name, state={f"{name}_h" if name == "feddyn" else "fedspeed_ghat": torch.zeros(7)})


# -- FedProx ---------------------------------------------------------------------------------------------
def test_fedprox_pulls_towards_global():
    x, y = data(48)
    avg, _, _ = run("fedavg", x=x, y=y, lr=1e-3, epochs=3, batch_size=8)
    prox, _, _ = run("fedprox", {"mu": 500.0}, x=x, y=y, lr=1e-3, epochs=3, batch_size=8)
    assert prox.norm() < 0.5 * avg.norm()
    zero, _, _ = run("fedprox", {"mu": 0.0}, x=x, y=y, lr=1e-3, epochs=3, batch_size=8)
    assert torch.equal(zero, avg)


def test_fedprox_step_is_exact_proximal_gradient_without_data_gradient():
    lr, mu = 0.1, 3.0
    c = torch.linspace(-1.0, 1.0, 15)
    trace: list[torch.Tensor] = []

    class ProxOnly(FedProx):
        """Data gradient ``c`` on the first step only, zero afterwards."""

        def compute_gradients(self, rnd, xb, yb):
            trace.append(torch.cat([p.detach().reshape(-1).clone() for p in rnd.params]))
            for p, s in zip(rnd.params, rnd.param_slices):
                p.grad = (c[s].view(p.shape).clone() if len(trace) == 1 else torch.zeros_like(p))

    x, y = data(16)
    delta, g, _ = run("fedprox", strategy=ProxOnly(build_config("fedprox", {"mu": mu})), x=x, y=y, lr=lr, batch_size=4)
    trace.append(g + delta)
    assert len(trace) == 5  # 4 steps
    assert close(trace[1] - trace[0], -lr * c)
    for k in range(1, 4):
        assert close(trace[k + 1] - trace[k], -lr * mu * (trace[k] - g))
    assert close(delta, (1 - lr * mu) ** 3 * (-lr * c))


# -- FedRS -----------------------------------------------------------------------------------------------
def test_restricted_logits_scales_missing_classes_only():
    logits = torch.randn(5, 4)
    held = torch.tensor([True, False, True, False])
    out = restricted_logits(logits, held, 0.3)
    assert torch.equal(out[:, held], logits[:, held])
    assert close(out[:, ~held], 0.3 * logits[:, ~held])
    assert torch.equal(restricted_logits(logits, held, 1.0), logits)
    with pytest.raises(ValueError):
        restricted_logits(logits, torch.ones(3, dtype=torch.bool), 0.5)
    assert class_counts(torch.tensor([0, 2, 2]), 4).tolist() == [1, 0, 2, 0]
    with pytest.raises(ValueError):
        class_counts(torch.tensor([0, 4]), 4)


def test_fedrs_alpha_one_is_fedavg_and_alpha_matches_hand_step():
    x, y = data(24, classes=2)  # node holds classes 0 and 1 of 3
    avg, _, _ = run("fedavg", x=x, y=y, batch_size=8, epochs=2)
    rs1, _, _ = run("fedrs", {"alpha": 1.0}, x=x, y=y, batch_size=8, epochs=2)
    assert torch.equal(rs1, avg)

    delta, g, _ = run("fedrs", {"alpha": 0.25}, x=x, y=y, lr=0.5)
    scale = torch.tensor([1.0, 1.0, 0.25])
    assert close(delta, -0.5 * lin_grad(g, x, y, scale))
    assert not close(delta, avg)
    inferred, _, _ = run("fedrs", {"alpha": 0.25}, x=x, y=y, lr=0.5, num_classes=None)
    assert torch.equal(inferred, delta)


def test_fedrs_with_all_classes_held_is_fedavg():
    x, y = data(30)
    assert set(y.tolist()) == {0, 1, 2}
    assert torch.equal(run("fedrs", {"alpha": 0.1}, x=x, y=y, batch_size=8)[0], run("fedavg", x=x, y=y, batch_size=8)[0])


# -- FedSAM ----------------------------------------------------------------------------------------------
def test_fedsam_step_uses_gradient_at_perturbed_point():
    lr, rho = 0.2, 0.5
    x, y = data(16)
    delta, g, _ = run("fedsam", {"rho": rho}, x=x, y=y, lr=lr)
    g1 = lin_grad(g, x, y)
    expected = -lr * lin_grad(g + rho * g1 / g1.norm(), x, y)
    assert close(delta, expected)
    assert not close(delta, -lr * g1)
    assert torch.equal(run("fedsam", {"rho": 0.0}, x=x, y=y, lr=lr)[0], run("fedavg", x=x, y=y, lr=lr)[0])


def test_fedsam_buffers_advance_once_per_batch():
    x, y = data(16)
    layout = Layout.from_module(mlp_bn())
    buffers = ~parameter_mask(layout)
    sam, _, _ = run("fedsam", {"rho": 0.5}, model=mlp_bn(), x=x, y=y)
    avg, _, _ = run("fedavg", model=mlp_bn(), x=x, y=y)
    # one step from the same weights: BatchNorm statistics see the same forward pass at w
    assert torch.equal(sam[buffers], avg[buffers])
    assert not torch.equal(sam[~buffers], avg[~buffers])


# -- FedDyn ----------------------------------------------------------------------------------------------
def test_feddyn_local_objective_and_state_update():
    lr, alpha = 0.3, 0.7
    x, y = data(16)
    h = torch.linspace(-0.5, 0.5, 15)
    delta, g, state = run("feddyn", {"alpha": alpha}, x=x, y=y, lr=lr, epochs=2, state={"feddyn_h": h.clone()})
    w1 = g - lr * (lin_grad(g, x, y) - h)
    w2 = w1 - lr * (lin_grad(w1, x, y) - h + alpha * (w1 - g))
    assert close(delta, w2 - g)
    assert close(state["feddyn_h"], h - alpha * (w2 - g))


def test_feddyn_new_node_starts_from_zero_and_buffers_carry_no_correction():
    alpha = 0.1
    x, y = data(16)
    delta, _, state = run("feddyn", {"alpha": alpha}, x=x, y=y, lr=0.3)
    assert close(delta, run("fedavg", x=x, y=y, lr=0.3)[0])  # h = 0, w = w_g on the only step
    assert close(state["feddyn_h"], -alpha * delta)

    mask = parameter_mask(Layout.from_module(mlp_bn()))
    _, _, state = run("feddyn", model=mlp_bn(), x=x, y=y, batch_size=4)
    assert torch.equal(state["feddyn_h"][~mask], torch.zeros(int((~mask).sum())))
    assert state["feddyn_h"][mask].abs().sum() > 0


def test_feddyn_server_step():
    alpha, lr = 0.5, 0.8
    step = build_server_step("feddyn", {"alpha": alpha})
    state: dict = {}
    a1, a2 = torch.randn(6), torch.randn(6)
    out1 = step(a1, state, num_participants=2, num_nodes=4, lr=lr)
    h1 = -alpha * (2 / 4) * a1
    assert close(state["h"], h1) and close(out1, lr * a1 - h1 / alpha)
    out2 = step(a2, state, num_participants=4, num_nodes=4, lr=lr)
    h2 = h1 - alpha * a2
    assert close(state["h"], h2) and close(out2, lr * a2 - h2 / alpha)

    mask = torch.tensor([True, True, True, True, False, False])
    masked: dict = {}
    out = step(a1, masked, num_participants=4, num_nodes=4, lr=lr, mask=mask)
    assert torch.equal(masked["h"][~mask], torch.zeros(2)) and close(out[~mask], lr * a1[~mask])
    assert close(out[mask], lr * a1[mask] + a1[mask])

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=True)["h"], state["h"])
    with pytest.raises(ValueError):
        step(a1, {}, num_participants=5, num_nodes=4, lr=lr)
    with pytest.raises(ValueError):
        step(torch.randn(2, 3), {}, num_participants=1, num_nodes=4, lr=lr)


def test_sgd_server_step_and_registry():
    state: dict = {}
    a = torch.randn(5)
    assert torch.equal(build_server_step("sgd")(a, state, num_participants=3, num_nodes=9, lr=0.5), 0.5 * a)
    assert state == {}
    with pytest.raises(ValueError, match="unknown server step 'adam'; known: feddyn, sgd"):
        build_server_step("adam")
    with pytest.raises(ValueError, match="'beta'.*allowed: alpha"):
        build_server_step("feddyn", {"beta": 1})
    assert isinstance(server_step_for_algorithm("fedprox", {"mu": 0.1}), SgdStep)
    dyn = server_step_for_algorithm("feddyn", {"alpha": 0.2})
    assert isinstance(dyn, FedDynStep) and dyn.config.alpha == 0.2
    assert isinstance(server_step_for_algorithm("fedspeed", {"lambda": 2.0, "alpha": 0.5}), SgdStep)
    with pytest.raises(ValueError):
        server_step_for_algorithm("feddyn", {"mu": 1.0})


def test_feddyn_server_h_is_mean_of_node_h_under_full_participation():
    alpha, nodes = 0.2, 3
    model = mlp_bn()
    layout, g = flat(model)
    mask = parameter_mask(layout)
    step, server_state = server_step_for_algorithm("feddyn", {"alpha": alpha}), {}
    states = [{} for _ in range(nodes)]
    shards = [data(12, seed=10 + k) for k in range(nodes)]
    config = TrainConfig(algorithm="feddyn", batch_size=4, lr=0.1, params={"alpha": alpha})
    for r in range(2):
        deltas = [train_local(model, layout, g, x, y, config, torch.Generator().manual_seed(r), states[k], 3)
                  for k, (x, y) in enumerate(shards)]
        g = g + step(torch.stack(deltas).mean(0), server_state, num_participants=nodes, num_nodes=nodes, lr=1.0,
                     mask=mask)
    assert close(server_state["h"], torch.stack([s["feddyn_h"] for s in states]).mean(0))


# -- FedSpeed --------------------------------------------------------------------------------------------
def test_fedspeed_update_and_prox_correction():
    lr, lam, rho, mix = 0.2, 2.0, 0.05, 0.7
    x, y = data(16)
    ghat = torch.linspace(0.3, -0.3, 15)
    params = {"lambda": lam, "rho": rho, "alpha": mix}
    delta, g, state = run("fedspeed", params, x=x, y=y, lr=lr, epochs=2, state={"fedspeed_ghat": ghat.clone()})
    w = g.clone()
    for _ in range(2):
        g1 = lin_grad(w, x, y)
        quasi = (1 - mix) * g1 + mix * lin_grad(w + rho * g1, x, y)
        w = w - lr * (quasi - ghat + (w - g) / lam)
    ghat_new = ghat - (w - g) / lam
    assert close(state["fedspeed_ghat"], ghat_new)
    assert close(delta, (w - lam * ghat_new) - g)


def test_fedspeed_first_round_reports_twice_the_local_move_and_buffers_untouched():
    x, y = data(16)
    delta, g, state = run("fedspeed", {"rho": 0.0, "lambda": 4.0}, x=x, y=y, lr=0.1)
    avg, _, _ = run("fedavg", x=x, y=y, lr=0.1)
    # g^ starts at 0 and w = w_g on the only step: w_K = w_g + avg, g^ = -avg / lambda, w_i = w_K + avg
    assert close(state["fedspeed_ghat"], -avg / 4.0)
    assert close(delta, 2 * avg)

    model = mlp_bn()
    mask = parameter_mask(Layout.from_module(model))
    spd, _, state = run("fedspeed", model=model, x=x, y=y)  # one full-batch step from the same weights
    plain, _, _ = run("fedavg", model=mlp_bn(), x=x, y=y)
    assert torch.equal(state["fedspeed_ghat"][~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(spd[~mask], plain[~mask])  # unnormalised ascent: same forward at w; buffers restored


# -- each algorithm learns ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_logistic_regression_federated_accuracy(name):
    """3 nodes with label skew train a logistic regression on separable blobs to > 0.9 accuracy."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0]])
    y = torch.arange(3).repeat_interleave(60)
    x = centers[y] + 0.7 * torch.randn(len(y), 4, generator=gen)
    # node k holds 50 of class k and 5 of class k+1 (and none of the third class)
    shards = []
    for k in range(3):
        own = (y == k).nonzero().flatten()[:50]
        other = (y == (k + 1) % 3).nonzero().flatten()[50:55]
        shards.append(torch.cat([own, other]))
    model = linear()
    layout, g = flat(model)
    params = {"fedrs": {"alpha": 0.5}}.get(name, {})
    step, server_state = server_step_for_algorithm(name, params), {}
    states = [{} for _ in range(3)]
    config = TrainConfig(algorithm=name, epochs=1, batch_size=16, lr=0.1, params=params)
    for r in range(5):
        deltas = [train_local(model, layout, g, x[s], y[s], config, torch.Generator().manual_seed(10 * r + k),
                              states[k], 3) for k, s in enumerate(shards)]
        g = g + step(torch.stack(deltas).mean(0), server_state, num_participants=3, num_nodes=3, lr=1.0)
    layout.load_into(model, g)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9, accuracy
