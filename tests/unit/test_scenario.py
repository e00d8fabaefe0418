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
