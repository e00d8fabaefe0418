"""Registry errors, describe(), and contract tests over every registered attack."""
from __future__ import annotations

import ast
import dataclasses
import pathlib
import subprocess
import sys

import pytest
import torch

from attacks import ATTACKS, KNOWLEDGE_LEVELS, DataAttack, UpdateAttack, build_attack, describe

UPDATE_LIKE = [name for name, (_, cls) in ATTACKS.items() if cls.kind in ("update", "wire")]
DATA = [name for name, (_, cls) in ATTACKS.items() if cls.kind == "data"]
RANDOM = {"untargeted", "gaussian", "layer_gaussian", "fang_trmean"}


def test_registry_names():
    assert set(ATTACKS) == {
        "label_flip", "targeted_flip", "boost", "model_replacement", "untargeted", "gaussian",
        "layer_gaussian", "sign_flip", "scaling", "alie", "ipm", "fang_krum", "fang_trmean", "min_max",
        "min_sum", "mimic", "alie_opt", "ipm_opt", "nonfinite", "malformed",
    }


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_class_attributes_and_frozen_config(name):
    config_cls, attack_cls = ATTACKS[name]
    assert attack_cls.kind in ("data", "update", "wire")
    assert attack_cls.needs in KNOWLEDGE_LEVELS
    assert isinstance(attack_cls.needs_defense, bool)
    attack = build_attack(name, {})
    assert isinstance(attack.config, config_cls)
    assert isinstance(attack, DataAttack if attack_cls.kind == "data" else UpdateAttack)
    fields = dataclasses.fields(config_cls)
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(attack.config, fields[0].name, None)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown attack 'nope'.*alie.*sign_flip"):
        build_attack("nope", {})


def test_unknown_param_names_the_key_and_lists_allowed():
    with pytest.raises(ValueError, match="'fractoin'.*allowed: fraction"):
        build_attack("label_flip", {"fractoin": 0.5})


@pytest.mark.parametrize("name, params, key", [
    ("label_flip", {"fraction": 1.5}, "fraction"),
    ("label_flip", {"fraction": "half"}, "fraction"),
    ("targeted_flip", {"fraction": -0.1}, "fraction"),
    ("sign_flip", {"scale": 0}, "scale"),
    ("ipm", {"epsilon": -1}, "epsilon"),
    ("min_max", {"perturbation": "diag"}, "perturbation"),
    ("nonfinite", {"mode": "zero"}, "mode"),
    ("malformed", {"mode": "too_big"}, "mode"),
    ("fang_trmean", {"b": 1.0}, "b"),
    ("model_replacement", {"p": 0}, "p"),
    ("boost", {"keep_base": "yes"}, "keep_base"),
    ("gaussian", {"sigma": float("nan")}, "sigma"),
])
def test_bad_values_name_the_key(name, params, key):
    with pytest.raises(ValueError, match=rf"attack '{name}': {key}="):
        build_attack(name, params)


def test_int_params_are_accepted_for_floats():
    assert build_attack("boost", {"lam": 5}).config.lam == 5.0
    assert isinstance(build_attack("boost", {"lam": 5}).config.lam, float)


def test_describe_lists_every_attack_with_its_metadata():
    text = describe()
    for name, (_, cls) in ATTACKS.items():
        assert f"{name}  kind={cls.kind} needs={cls.needs} needs_defense={cls.needs_defense}" in text
    assert "params: fraction=1.0" in text and "z=None" in text


def test_python_dash_m_attacks_prints_describe():
    out = subprocess.run([sys.executable, "-m", "attacks"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == describe()


@pytest.mark.parametrize("name", UPDATE_LIKE)
def test_update_contract(name, make_ctx, d):
    out = build_attack(name, {}).craft(make_ctx())
    assert isinstance(out, torch.Tensor)
    assert out.shape == (d,) and out.dtype == torch.float32
    if name == "nonfinite":
        assert not bool(torch.isfinite(out).any())
    else:
        assert bool(torch.isfinite(out).all())
    again = build_attack(name, {}).craft(make_ctx())
    assert torch.equal(out, again) or (name == "nonfinite" and torch.isnan(again).all())
    if name in RANDOM:
        assert not torch.equal(out, build_attack(name, {}).craft(make_ctx(seed=1)))


@pytest.mark.parametrize("name", UPDATE_LIKE)
def test_update_attacks_do_not_modify_their_inputs(name, make_ctx):
    ctx = make_ctx()
    before = {k: getattr(ctx, k).clone() for k in ("own", "colluders", "honest", "global_weights")}
    build_attack(name, {}).craft(ctx)
    for k, v in before.items():
        assert torch.equal(getattr(ctx, k), v), k


def test_malformed_returns_own_unchanged(make_ctx):
    attack = build_attack("malformed", {"mode": "wrong_round"})
    ctx = make_ctx()
    assert attack.kind == "wire" and attack.mode == "wrong_round"
    assert torch.equal(attack.craft(ctx), ctx.own)


@pytest.mark.parametrize("mode, check", [("nan", torch.isnan), ("inf", torch.isposinf), ("-inf", torch.isneginf)])
def test_nonfinite_modes_and_fraction(mode, check, make_ctx, d):
    out = build_attack("nonfinite", {"mode": mode, "fraction": 0.25}).craft(make_ctx())
    assert int(check(out).sum()) == round(0.25 * d)
    assert int(torch.isfinite(out).sum()) == d - round(0.25 * d)


@pytest.mark.parametrize("name", DATA)
def test_data_contract(name):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 2, generator=g), torch.randint(0, 4, (30,), generator=g)
    x2, y2 = build_attack(name, {}).poison(x, y, 4, torch.Generator().manual_seed(1))
    assert x2.shape == x.shape and y2.shape == y.shape and y2.dtype == y.dtype


# The dependency-free helpers of the base layer that every package may use.
SHARED_HELPERS = {"proto.registry", "proto.seeding"}


def _absolute_imports(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
    return names


def test_attacks_package_imports_nothing_of_the_project():
    """Architecture rule: attacks/ is pure torch/numpy (no fednode, orchestrator, and of
    proto only the dependency-free proto.registry and proto.seeding)."""
    import attacks
    import proto

    root = pathlib.Path(attacks.__file__).parent
    forbidden = {"proto", "fednode", "orchestrator"}
    for path in root.glob("*.py"):
        for n in _absolute_imports(path):
            assert n in SHARED_HELPERS or n.split(".")[0] not in forbidden, f"{path.name} imports {n}"
    for helper in SHARED_HELPERS:  # and those helpers import nothing of the project
        path = pathlib.Path(proto.__file__).parent / f"{helper.split('.')[1]}.py"
        for n in _absolute_imports(path):
            assert n.split(".")[0] not in forbidden | {"attacks"}, f"{helper} imports {n}"
