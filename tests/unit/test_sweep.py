"""Sweeps: grid expansion, include/exclude, cell ids, role overrides, running cells with a fake
runner (success, failure, timeout, resume), results rows and the report from synthetic results."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator.labels import attack_label, byzantine_names, defense_label, selects_clients
from orchestrator.scenario import ScenarioError, load, parse_override
from orchestrator.sweep import (SweepError, SweepRunner, metrics_of, parse_sweep, plan_parallel, safe_id,
                                stop_process, toml_value)

BASE = {"name": "b", "model": {"name": "mlp"}, "federation": {"rounds": 2}, "defense": {"name": "median", "f": 1},
        "roles": [{"name": "honest", "count": 5}, {"name": "byz", "count": 2, "byzantine": True, "attack": "sign_flip"}]}


def sweep_of(**raw):
    return parse_sweep({"base": BASE, **raw})


# ----- role overrides (orchestrator/scenario.py) ------------------------------------------------------------------
@pytest.fixture
def scenario_file(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('[[roles]]\nname = "honest"\ncount = 5\n\n[[roles]]\nname = "byz"\ncount = 2\nbyzantine = true\n'
                 'attack = "sign_flip"\n')
    return p


def test_role_keys_are_overridden_by_the_role_name(scenario_file):
    s = load(scenario_file, ["roles.byz.attack=alie", "roles.byz.count=3", "roles.byz.attack_params.z=1.5",
                             "roles.honest.count=4"])
    honest, byz = s.roles
    assert (honest.count, byz.count, byz.attack, byz.attack_params) == (4, 3, "alie", {"z": 1.5})


@pytest.mark.parametrize("override, words", [
    ("roles.bzy.attack=alie", ["roles.'bzy'", "names no role", "'honest'", "'byz'"]),
    ("roles.byz.atack=alie", ["'roles.byz.atack'", "allowed keys in a role", "attack_params"]),
    ("roles.byz=1", ["roles.<name>.<key>", "'byz'"]),
    ("roles=[{name='x', count=1}]", ["roles cannot be replaced", "'honest'"]),
    ("roles.0.count=1", ["roles.'0'", "names no role"]),
    ("roles.byz.name=x", ["a role's name"]),
    ("roles.byz.count=-1", ["roles[1].count", ">= 0"]),
    ("roles.byz.attack.z=1", ["roles.byz.attack is not a table"]),
])
def test_bad_role_overrides_name_the_key_and_the_roles(scenario_file, override, words):
    with pytest.raises(ScenarioError) as e:
        load(scenario_file, [override])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_role_overrides_without_roles_in_the_file_address_the_default_role(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text("[federation]\nrounds = 1\n")
    assert load(p, ["roles.honest.count=3"]).num_nodes == 3


# ----- the grid ---------------------------------------------------------------------------------------------------
def test_toml_values_read_back_through_set():
    for v in ["alie", 'q"uote\\', 3, -2, 1.5, 1e-06, True, False, [1, "a"], {"z": 1.5, "inner": {"name": "krum"}}, {}]:
        path, back = parse_override(f"a.b={toml_value(v)}")
        assert back == v, (v, back)


def test_grid_is_the_product_of_the_axes_in_file_order():
    sw = sweep_of(set=["federation.rounds=3"], axes={
        "defense": {"key": "defense.name", "values": ["median", "krum"]},
        "attack": {"values": [{"label": "alie", "set": {"roles.byz.attack": "alie"}},
                              {"label": "ipm", "set": {"roles.byz.attack": "ipm",
                                                       "roles.byz.attack_params": {"epsilon": 0.5}}}]},
        "seed": [0, 1]})
    cells = sw.cells()
    assert [c.id for c in cells][:3] == ["defense=median__attack=alie__seed=0", "defense=median__attack=alie__seed=1",
                                        "defense=median__attack=ipm__seed=0"]
    assert len(cells) == 8
    c = cells[3]
    assert c.label_dict == {"defense": "median", "attack": "ipm", "seed": "1"}
    assert c.sets == ("federation.rounds=3", 'defense.name="median"', 'roles.byz.attack="ipm"',
                      'roles.byz.attack_params={ "epsilon" = 0.5 }', "seed=1")


def test_labelled_values_and_single_valued_axes_stay_out_of_ids():
    sw = sweep_of(axes={"defense": {"key": "defense", "values": [
        {"label": "krum-lc", "value": {"name": "krum", "f": 1, "params": {"layerwise": True, "distance": "cosine"}}},
        {"value": {"name": "median"}}]}, "rounds": {"key": "federation.rounds", "values": [2]}})
    assert [c.id for c in sw.cells()] == ["defense=krum-lc", "defense=name=median"]
    assert sweep_of(axes={"seed": [3]}).cells()[0].id == "base"


def test_include_and_exclude_filter_by_partial_cells():
    axes = {"defense": {"key": "defense.name", "values": ["median", "krum", "mean"]},
            "attack": {"key": "roles.byz.attack", "values": ["alie", "ipm"]}}
    ids = [c.id for c in sweep_of(axes=axes, exclude=[{"defense": "krum", "attack": "alie"}, {"defense": "mean"}]).cells()]
    assert ids == ["defense=median__attack=alie", "defense=median__attack=ipm", "defense=krum__attack=ipm"]
    ids = [c.id for c in sweep_of(axes=axes, include=[{"defense": ["mean", "krum"], "attack": "ipm"}]).cells()]
    assert ids == ["defense=krum__attack=ipm", "defense=mean__attack=ipm"]


@pytest.mark.parametrize("raw, words", [
    ({"axes": {"defense": ["median"]}, "exclude": [{"defnse": "median"}]}, ["exclude[0].defnse", "no such axis"]),
    ({"axes": {"defense": {"key": "defense.name", "values": ["median"]}}, "include": [{"defense": "krum"}]},
     ["include[0].defense", "'krum'", "'median'"]),
    ({"axes": {"d": {"key": "defense.name", "values": ["a", "a"]}}}, ["axes.d", "'a' names two values"]),
    ({"axes": {"d": {"values": ["a"]}}}, ["axes.d.values[0]", "needs key"]),
    ({"axes": {"d": {"values": [{"set": {"defense.name": "krum"}}]}}}, ["axes.d.values[0]", "needs a label"]),
    ({"axes": {"status": [1]}}, ["axes.status", "results.csv"]),
    ({"axis": {}}, ["unknown key 'axis'", "axes"]),
    ({"timeout": 0}, ["timeout"]),
])
def test_bad_sweep_files_name_the_key(raw, words):
    with pytest.raises(SweepError) as e:
        sweep_of(**raw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_cell_ids_are_filesystem_safe_and_distinct():
    assert safe_id("defense=nnm(krum, cosine)__attack=a/b") == "defense=nnm-krum,-cosine-__attack=a-b"
    long = "x=" + "y" * 300
    assert len(safe_id(long)) <= 120 and safe_id(long) != safe_id(long + "z")
    sw = sweep_of(axes={"d": {"key": "defense.name", "values": [{"label": "a b", "value": "median"},
                                                                 {"label": "a/b", "value": "krum"}]}})
    ids = [c.id for c in sw.cells()]
    assert len(set(ids)) == 2 and all("/" not in i and " " not in i for i in ids)


def test_base_from_a_file_keeps_its_name(tmp_path):
    (tmp_path / "sc.toml").write_text('[federation]\nrounds = 2\n')
    sw = parse_sweep({"base": "sc.toml", "axes": {"seed": [0]}}, tmp_path)
    assert sw.base.startswith('name = "sc"\n')


def test_parallel_is_bounded_by_the_cores():
    assert plan_parallel(1, 2)[:2] == (1, 1)
    k, slots, note = plan_parallel(4, 2)
    assert (k, slots) == (1, 1) and "oversubscribe" in note
    assert plan_parallel(2, 16)[:2] == (2, 7)
    assert plan_parallel(8, 16, fixed_slots=3)[:2] == (4, 3)


# ----- labels and per-cell measures -------------------------------------------------------------------------------
def test_labels_and_selection():
    assert defense_label("krum", {"layerwise": True, "distance": "cosine", "clip": "median"}) == \
        "krum(layerwise, cosine, clip=median)"
    assert defense_label("nnm", {"inner": {"name": "krum", "distance": "cosine"}}) == "nnm(krum(cosine))"
    assert [selects_clients(n, p) for n, p in [("krum", {}), ("bulyan", {}), ("median", {}), ("trimmed_mean", {}),
                                               ("centered_clipping", {}), ("mean", {}), ("nnm", {}),
                                               ("nnm", {"inner": "krum"}), ("vdc", {}), ("stpa", {}),
                                               ("layerwise", {"inner": {"name": "geomed"}})]] == \
        [True, True, False, False, False, False, False, True, True, True, True]
    roles = BASE["roles"] + [{"name": "b2", "count": 1, "byzantine": True, "attack": "alie", "attack_params": {"z": 1.5}}]
    assert attack_label(roles) == "sign_flip+alie(z=1.5)" and attack_label(BASE["roles"][:1]) == "none"
    assert byzantine_names(roles) == {"byz-000", "byz-001", "b2-000"}


def test_detection_is_pooled_over_rounds_and_only_for_selecting_rules():
    rows = [{"round": 0, "accuracy": 0.5, "loss": 2.0, "rejected": ["byz-000", "h-001"], "byzantine_accepted": 1,
             "byzantine_share_accepted": 0.25, "t_aggregate": 0.01},
            {"round": 1, "accuracy": 0.7, "loss": 1.0, "rejected": ["byz-000", "byz-001"], "byzantine_accepted": 0,
             "byzantine_share_accepted": 0.0, "t_aggregate": 0.03},
            {"round": 2, "outcome": "abandoned: quorum"}]
    m = metrics_of(rows, {"byz-000", "byz-001"}, selects=True)
    assert m["detection_precision"] == pytest.approx(3 / 4) and m["detection_recall"] == pytest.approx(3 / 4)
    assert (m["final_accuracy"], m["best_accuracy"], m["last5_accuracy"], m["min_loss"]) == (0.7, 0.7, 0.6, 1.0)
    assert m["t_aggregate_mean"] == pytest.approx(0.02) and m["byzantine_share_accepted"] == pytest.approx(0.125)
    m = metrics_of(rows, {"byz-000", "byz-001"}, selects=False)
    assert "detection_precision" not in m and "detection_recall" not in m


def test_summary_carries_the_defense_label(tmp_path):
    from orchestrator.metrics import MetricsWriter
    (tmp_path / "scenario.json").write_text(json.dumps({"defense": {"name": "krum", "params": {"layerwise": True}}}))
    w = MetricsWriter(tmp_path)
    assert w.summary(1.0, {"defense": "krum"})["defense_label"] == "krum(layerwise)"
    assert json.loads((tmp_path / "summary.json").read_text())["defense_label"] == "krum(layerwise)"


# ----- running cells with a fake runner ---------------------------------------------------------------------------
FAKE = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path
    args = sys.argv[1:]
    run_dir = Path(args[args.index("--run-dir") + 1])
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    lr = next(s.split("=", 1)[1] for s in sets if s.startswith("training.lr="))
    with open(os.environ["FAKE_CALLS"], "a") as fh:
        fh.write(f"{lr} {os.getpid()}\\n")
    run_dir.mkdir(parents=True, exist_ok=True)
    roles = [{"name": "honest", "count": 5}, {"name": "byz", "count": 2, "byzantine": True, "attack": "alie"}]
    (run_dir / "scenario.json").write_text(json.dumps({"seed": 0, "defense": {"name": "krum", "params": {}},
                                                       "roles": roles}))
    if lr == "0.3":
        time.sleep(120)
    if lr == "0.2":
        print("RuntimeError: the fake cell fails")
        sys.exit(3)
    with open(run_dir / "metrics.jsonl", "w") as fh:
        for r in range(2):
            fh.write(json.dumps({"round": r, "accuracy": float(lr) + r / 10, "loss": 1.0 - r / 10,
                                 "rejected": ["byz-000", "honest-000"], "byzantine_accepted": 1,
                                 "byzantine_share_accepted": 0.5, "t_aggregate": 0.01}) + "\\n")
    (run_dir / "summary.json").write_text("{}")
''')


@pytest.fixture
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE)
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    return [sys.executable, str(script)], calls


def _results(out: Path) -> dict[str, dict[str, str]]:
    with (out / "results.csv").open() as fh:
        return {r["cell"]: r for r in csv.DictReader(fh)}


def test_cells_run_fail_and_time_out_without_stopping_the_sweep_and_resume_skips_finished_ones(tmp_path, fake):
    command, calls = fake
    sw = sweep_of(axes={"lr": {"key": "training.lr", "values": [0.1, 0.2, 0.3]}})
    out = tmp_path / "sweep"
    events = []
    runner = SweepRunner(sw, out, command=command, timeout=3.0, on_event=lambda k, i: events.append((k, i["cell"])),
                         validate=False)
    runner.run(poll=0.05)
    rows = _results(out)
    assert {c: r["status"] for c, r in rows.items()} == {"lr=0.1": "ok", "lr=0.2": "failed", "lr=0.3": "timeout"}
    ok, failed, slow = rows["lr=0.1"], rows["lr=0.2"], rows["lr=0.3"]
    assert float(ok["final_accuracy"]) == pytest.approx(0.2) and float(ok["best_accuracy"]) == pytest.approx(0.2)
    assert float(ok["detection_precision"]) == 0.5 and float(ok["detection_recall"]) == pytest.approx(2 / 4)
    assert ok["defense_label"] == "krum" and ok["attack_label"] == "alie" and ok["lr"] == "0.1"
    assert failed["returncode"] == "3" and "fake cell fails" in failed["error"]
    assert "timed out after 3 s" in slow["error"] and slow["final_accuracy"] == ""
    assert failed["log"] == "cells/lr=0.2/cell.log" and (out / failed["log"]).exists()
    rec = json.loads((out / "cells" / "lr=0.1" / "cell.json").read_text())
    assert rec["sets"] == ["training.lr=0.1"] and rec["status"] == "ok"
    assert "--run-dir" in rec["command"] and rec["command"][rec["command"].index("--run-dir") + 1].endswith("lr=0.1")
    pid = int(calls.read_text().split()[-1])  # the timed-out cell was stopped by its PID
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert ("finished", "lr=0.3") in events

    with pytest.raises(SweepError, match="--resume"):
        SweepRunner(sw, out, command=command, validate=False).run()
    before = calls.read_text().splitlines()
    SweepRunner(sw, out, command=command, timeout=3.0, resume=True, validate=False).run(poll=0.05)
    again = calls.read_text().splitlines()[len(before):]
    assert sorted(line.split()[0] for line in again) == ["0.2", "0.3"]  # the finished cell was not redone
    assert _results(out)["lr=0.1"]["status"] == "ok"


def test_invalid_cells_are_recorded_and_skipped(tmp_path, fake):
    command, calls = fake
    sw = sweep_of(axes={"f": {"key": "defense.f", "values": [1, 9]}}, set=["training.lr=0.1", "defense.name=\"krum\""])
    SweepRunner(sw, tmp_path / "s", command=command).run(poll=0.05)
    rows = _results(tmp_path / "s")
    assert rows["f=1"]["status"] == "ok"
    assert rows["f=9"]["status"] == "invalid" and "defense.f" in rows["f=9"]["error"]
    assert len(calls.read_text().splitlines()) == 1


def test_stopping_cells_escalates_to_sigkill_by_pid_and_takes_their_descendants(tmp_path):
    from orchestrator.sweep import stop_processes

    stubborn = ("import signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "c = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)']); "
                "open(sys.argv[1], 'w').write(str(c.pid)); time.sleep(60)")
    procs = [subprocess.Popen([sys.executable, "-c", stubborn, str(tmp_path / f"child{i}")], start_new_session=True)
             for i in range(2)]
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    deadline = time.monotonic() + 20
    while not all((tmp_path / f"child{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    children = [int((tmp_path / f"child{i}").read_text()) for i in range(2)]
    t0 = time.monotonic()
    stop_processes([*procs, polite], grace=1.0)
    assert time.monotonic() - t0 < 6  # one grace period for all of them, not one each
    assert all(p.returncode is not None for p in [*procs, polite]) and polite.returncode != -9
    time.sleep(0.2)
    for pid in children:  # (reparented, then reaped by init; or a zombie for a moment)
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    stop_process(polite)  # (already stopped: nothing to do)


# ----- the report from a synthetic results.csv --------------------------------------------------------------------
def _synthetic(out: Path) -> None:
    fields = ["cell", "status", "defense", "attack", "seed", "defense_label", "attack_label", "byzantine_fraction",
              "final_accuracy", "best_accuracy", "last5_accuracy", "final_loss", "min_loss", "detection_precision",
              "detection_recall", "byzantine_share_accepted", "t_aggregate_mean", "wall_seconds", "run_dir", "log",
              "error"]
    acc = {("median", "alie"): 0.60, ("median", "ipm"): 0.80, ("krum", "alie"): 0.70, ("krum", "ipm"): 0.40}
    rows = []
    for (d, a), base in acc.items():
        for seed in (0, 1):
            cid = f"defense={d}__attack={a}__seed={seed}"
            (out / "cells" / cid).mkdir(parents=True)
            with (out / "cells" / cid / "metrics.jsonl").open("w") as fh:
                for r in range(3):
                    fh.write(json.dumps({"round": r, "accuracy": base - 0.1 * (2 - r), "loss": 1 - r / 5,
                                         "t_aggregate": 0.002 if d == "median" else 0.005}) + "\n")
            sel = d == "krum"
            rows.append({"cell": cid, "status": "ok", "defense": d, "attack": a, "seed": seed, "defense_label": d,
                         "attack_label": a, "byzantine_fraction": 0.2, "final_accuracy": base + (0.02 if seed else -0.02),
                         "best_accuracy": base, "last5_accuracy": base, "final_loss": 0.5, "min_loss": 0.4,
                         "detection_precision": 0.5 if sel else "", "detection_recall": 1.0 if sel else "",
                         "byzantine_share_accepted": 0.1, "t_aggregate_mean": 0.002, "wall_seconds": 10,
                         "run_dir": f"cells/{cid}", "log": f"cells/{cid}/cell.log", "error": ""})
    rows.append({**rows[0], "cell": "defense=mean__attack=alie__seed=0", "defense": "mean", "status": "failed",
                 "error": "RuntimeError: boom", "final_accuracy": ""})
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def test_report_from_results_csv_and_cell_folders(tmp_path):
    from orchestrator.report import main, write_report

    _synthetic(tmp_path)
    md = write_report(tmp_path).read_text()
    assert "| median | 0.600 ± 0.028 | 0.800 ± 0.028 |" in md  # mean ± std over the two seeds
    worst = md.split("## Worst case")[1].split("##")[0]
    assert "| median | 0.600 ± 0.028 | alie |" in worst and "| krum | 0.400 ± 0.028 | ipm |" in worst
    assert worst.index("| median") < worst.index("| krum")  # most robust first
    detection = md.split("## Detection")[1].split("##")[0]
    assert "| krum | P 0.50 / R 1.00 | P 0.50 / R 1.00 |" in detection and "| median" not in detection
    assert "## Cells that did not finish" in md and "RuntimeError: boom" in md
    for png in ("heatmap.png", "rounds.png", "aggregation-cost.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"]({png})" in md
    assert "Byzantine fraction" not in md  # one fraction only: no such figure
    (tmp_path / "report.md").unlink()
    assert main([str(tmp_path), "--no-figures"]) == 0 and (tmp_path / "report.md").exists()


def test_report_splits_other_axes_and_plots_accuracy_against_the_byzantine_fraction(tmp_path):
    from orchestrator.report import write_report

    fields = ["cell", "status", "defense", "attack", "byz", "byzantine_fraction", "final_accuracy", "run_dir"]
    with (tmp_path / "results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for d in ("median", "krum"):
            for a in ("alie", "ipm"):
                for byz, frac in (("1", 0.1), ("3", 0.3)):
                    w.writerow({"cell": f"{d}-{a}-{byz}", "status": "ok", "defense": d, "attack": a, "byz": byz,
                                "byzantine_fraction": frac, "final_accuracy": 0.9 - frac, "run_dir": "cells/none"})
    md = write_report(tmp_path).read_text()
    assert "## Accuracy: defense × attack — byz=1" in md and "## Worst case — byz=3" in md
    assert "| median | 0.600 | 0.600 |" in md
    assert (tmp_path / "heatmap-byz=1.png").exists() and (tmp_path / "byzantine-fraction.png").exists()


def test_a_cell_that_ran_short_is_not_ok(tmp_path):
    from orchestrator.sweep import rounds_short

    (tmp_path / "scenario.json").write_text(json.dumps({"federation": {"rounds": 5}}))
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"rounds_completed": 4, "rounds_abandoned": 1}))
    assert rounds_short(tmp_path) is None  # an abandoned round was run
    summary.write_text(json.dumps({"rounds_completed": 0, "rounds_abandoned": 0}))
    assert rounds_short(tmp_path) == "completed 0 of 5 rounds (0 run; see summary.json and metrics.jsonl)"
    summary.write_text(json.dumps({"rounds_completed": 3, "rounds_abandoned": 0}))
    assert rounds_short(tmp_path).startswith("completed 3 of 5 rounds")
    summary.write_text(json.dumps({"rounds_completed": 0, "rounds_abandoned": 5}))
    assert rounds_short(tmp_path).startswith("completed 0 of 5")
