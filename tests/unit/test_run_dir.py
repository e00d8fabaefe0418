"""Run folders: ``--set`` values name the folder of a ``run`` (orchestrator/runner.py
make_run_dir, orchestrator/labels.py override_tag)."""
from __future__ import annotations

import re

from orchestrator.labels import override_tag
from orchestrator.runner import make_run_dir
from orchestrator.scenario import load


def test_override_tag_keeps_the_last_key_part_and_drops_toml_quotes():
    assert override_tag(["federation.rounds=5", 'defense.name="median"']) == "rounds=5__name=median"
    assert override_tag([]) == ""


def test_override_tag_keeps_full_keys_when_last_parts_clash():
    tag = override_tag(['defense.name="krum"', 'roles.byz.attack="alie"', 'model.name="cnn"'])
    assert tag == "defense.name=krum__attack=alie__model.name=cnn"


def test_override_tag_is_filesystem_safe_and_short():
    tag = override_tag(['defense.params={ layerwise = true, distance = "cosine" }', "roles.byz.attack_params.z=1.5"])
    assert re.fullmatch(r"[A-Za-z0-9._=,+-]+", tag), tag
    long = override_tag([f"roles.r{i}.attack_params.z={i}.5" for i in range(40)])
    other = override_tag([f"roles.r{i}.attack_params.z={i}.5" for i in range(41)])
    assert len(long) <= 80 and long != other


def test_run_folder_names_the_overridden_values(tmp_path):
    (tmp_path / "s.toml").write_text('name = "demo"\n')
    sets = ["federation.rounds=3", 'defense.name="median"']
    s = load(str(tmp_path / "s.toml"), sets)
    plain = make_run_dir(s, str(tmp_path / "runs"))
    assert re.fullmatch(r"demo-\d{8}-\d{6}", plain.name), plain.name
    tagged = make_run_dir(s, str(tmp_path / "runs"), sets)
    assert re.fullmatch(r"demo__rounds=3__name=median-\d{8}-\d{6}", tagged.name), tagged.name
    tagged.mkdir(parents=True)
    again = make_run_dir(s, str(tmp_path / "runs"), sets)
    assert again != tagged and again.name.startswith("demo__rounds=3__name=median-")
