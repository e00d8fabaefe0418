"""One real two-cell sweep end to end: `python -m orchestrator sweep` runs two real federations
(4 node processes each, 2 rounds, MLP on MNIST-5k) and writes results.csv and report.md."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

SWEEP = '''
name = "it"
timeout = 120
[base]
name = "it"
model = { name = "mlp" }
training = { epochs = 1, batch_size = 64, lr = 0.05 }
federation = { rounds = 2, round_timeout = 30.0 }
defense = { name = "median", f = 0 }
output = { plot = false, live = false, checkpoint_every = 0 }
roles = [{ name = "honest", count = 3 }, { name = "byz", count = 1, byzantine = true, attack = "gaussian" }]

[axes.defense]
key = "defense.name"
values = ["median", "krum"]
'''


def test_two_cell_sweep_end_to_end(tmp_path):
    spec = tmp_path / "it.toml"
    spec.write_text(SWEEP)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(spec), "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with (out / "results.csv").open() as fh:
        rows = {r["cell"]: r for r in csv.DictReader(fh)}
    assert list(rows) == ["defense=median", "defense=krum"]
    for cell, r in rows.items():
        assert r["status"] == "ok" and r["rounds_completed"] == "2" and 0 < float(r["final_accuracy"]) <= 1
        assert r["attack_label"] == "gaussian" and r["byzantine"] == "1" and r["nodes"] == "4"
        scenario = json.loads((out / "cells" / cell / "scenario.json").read_text())
        assert scenario["defense"]["name"] == r["defense"] and (out / r["log"]).exists()
    assert rows["defense=median"]["detection_precision"] == "" and rows["defense=krum"]["detection_recall"] != ""
    report = (out / "report.md").read_text()
    assert "| defense \\ attack | gaussian |" in report and "## Worst case" in report
    assert "| krum | P " in report.split("## Detection")[1]
    assert (out / "heatmap.png").exists() and (out / "aggregation-cost.png").exists()
