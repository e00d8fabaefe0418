"""One real two-cell sweep end to end: `python -m orchestrator sweep` runs two real federations
(4 node processes each, 2 rounds, MLP on MNIST-5k) and writes results.csv and report.md."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.integration.mpi_support import NEEDS_MPI

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


def run_sweep(tmp_path, *options: str, timeout: float = 240) -> tuple:
    """``python -m orchestrator sweep`` of SWEEP with ``options``: (its out folder, results.csv by cell)."""
    spec = tmp_path / "it.toml"
    spec.write_text(SWEEP)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(spec), "--out", str(out), *options],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with (out / "results.csv").open() as fh:
        return out, {r["cell"]: r for r in csv.DictReader(fh)}


def test_two_cell_sweep_end_to_end(tmp_path):
    out, rows = run_sweep(tmp_path)
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


@NEEDS_MPI[0]
@NEEDS_MPI[1]
def test_two_cell_sweep_over_mpirun(tmp_path):
    """`sweep --mpi 2`: each cell is one real mpirun job (./launch.sh mpi): rank 0 the
    orchestrator, rank 1 the node host of its 4 node processes."""
    out, rows = run_sweep(tmp_path, "--mpi", "2", timeout=300)
    assert list(rows) == ["defense=median", "defense=krum"]
    for cell, r in rows.items():
        assert r["status"] == "ok" and r["rounds_completed"] == "2" and 0 < float(r["final_accuracy"]) <= 1, r
        d = out / "cells" / cell
        command = json.loads((d / "cell.json").read_text())["command"]
        assert command[1:4] == ["mpi", "-np", "2"] and command[0].endswith("launch.sh"), command
        assert (d / "ranks" / "rank-0.log").exists() and (d / "ranks" / "rank-1.log").exists()
        assert "Traceback" not in (d / "ranks" / "rank-1.log").read_text()


def test_mpi_options_are_checked():
    from orchestrator.sweep import SweepError, mpi_command

    with pytest.raises(SweepError, match="at least 2 ranks"):
        mpi_command(1)
    with pytest.raises(SweepError, match="no such file"):
        mpi_command(3, "/nonexistent/hosts.txt")
    cmd = mpi_command(3, mpirun_args="--mca btl_tcp_if_include 10.0.0.0/24")
    assert cmd[1:] == ["mpi", "-np", "3", "--", "--mca", "btl_tcp_if_include", "10.0.0.0/24", "--"]
