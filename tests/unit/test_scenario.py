from pathlib import Path

import pytest

from orchestrator.scenario import ScenarioError, from_dict, load

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_scenarios_load(path):
    s = load(path)
    assert s.num_nodes >= 1 and s.federation.rounds >= 1


@pytest.mark.parametrize("raw, words", [
    ({"modle": {}}, ["'modle'", "allowed top-level keys", "model"]),
    ({"model": {"nmae": "cnn"}}, ["'model.nmae'", "allowed keys", "name"]),
    ({"model": {"name": "vgg"}}, ["model.name", "'vgg'", "'cnn'", "'resnet18'"]),
    ({"data": {"partition": "skewed"}}, ["data.partition", "'dirichlet'"]),
    ({"federation": {"rounds": 0}}, ["federation.rounds", ">= 1"]),
    ({"federation": {"rounds": "ten"}}, ["federation.rounds", "integer"]),
    ({"federation": {"selection": "sample"}}, ["federation.sample_size"]),
    ({"training": {"lr": -1}}, ["training.lr"]),
    ({"roles": [{"name": "a", "count": 2, "colour": "red"}]}, ["roles[0].colour", "allowed keys"]),
    ({"roles": [{"name": "a", "count": 1, "dropout": 2.0}]}, ["roles[0].dropout"]),
])
def test_bad_scenarios_name_the_key_and_the_allowed_values(raw, words):
    with pytest.raises(ScenarioError) as e:
        from_dict(raw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_overrides_apply_and_are_checked(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('[federation]\nrounds = 3\n[[roles]]\nname = "h"\ncount = 2\n')
    s = load(p, ["federation.rounds=7", "model.name=mlp", "training.lr=0.1"])
    assert s.federation.rounds == 7 and s.model.name == "mlp" and s.training.lr == 0.1 and s.name == "s"
    with pytest.raises(ScenarioError, match="federation.roundz"):
        load(p, ["federation.roundz=7"])
    with pytest.raises(ScenarioError, match="does not exist"):
        load(tmp_path / "missing.toml")


def test_defense_and_f_pairs_that_can_never_work_are_refused_at_load():
    from orchestrator.scenario import ScenarioError, from_dict

    base = {"roles": [{"name": "h", "count": 10}]}
    from_dict({**base, "defense": {"name": "krum", "f": 3}})  # 10 >= 2f + 3 = 9
    with pytest.raises(ScenarioError, match=r"defense\.f = 4: defense 'krum' needs at least 11 updates"):
        from_dict({**base, "defense": {"name": "krum", "f": 4}})
    with pytest.raises(ScenarioError, match=r"defense\.f .*'bulyan' needs at least 15"):
        from_dict({**base, "defense": {"name": "bulyan", "f": 3}})
    # sample mode: the sample (with over-selection) bounds the rows, not the roster
    with pytest.raises(ScenarioError, match="defense.f"):
        from_dict({**base, "federation": {"selection": "sample", "sample_size": 5}, "defense": {"name": "krum", "f": 2}})
    with pytest.raises(ScenarioError, match="unknown defense 'nosuch'"):
        from_dict({**base, "defense": {"name": "nosuch"}})


@pytest.mark.parametrize("raw, key", [
    ({"training": {"algorithm": "fedprox", "params": {"mu": "x"}}}, "training.params"),
    ({"training": {"algorithm": "fedprox", "params": {"mu": float("nan")}}}, "training.params"),
    ({"training": {"algorithm": "fedavg", "params": {"nosuch": 1}}}, "training.params"),
    ({"roles": [{"name": "h", "count": 10**12}]}, "roles[0].count"),
    ({"federation": {"quorum": 1e300}}, "federation.quorum"),
    ({"federation": {"quorum": 2.5}}, "federation.quorum"),
])
def test_values_the_loader_used_to_accept_are_refused_by_key(raw, key):
    from orchestrator.scenario import ScenarioError, from_dict

    with pytest.raises(ScenarioError, match=f"^{key.replace('[', '.').replace(']', '.')}"):
        from_dict(raw)
