"""bench/round_overhead.py's arithmetic on a synthetic run folder, and the node's span line."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from fednode.client import Task
from fednode.node import _span

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("round_overhead", ROOT / "bench" / "round_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_span_line_parses_back():
    task = Task("train", 3, 3, header_at=time.monotonic() - 1.5, download_seconds=0.25)
    line = f"a: round 3 update sent{_span(task)}"
    (r, span, down, cpu), = _bench().SPAN.findall(line)
    assert r == "3" and float(down) == 0.25 and 1.5 <= float(span) < 60.0 and cpu == ""
    task.train_cpu = 0.125
    (_, _, _, cpu), = _bench().SPAN.findall(f"a: round 3 update sent{_span(task)}")
    assert float(cpu) == 0.125
    assert _span(Task("train", 3, 3)) == ""  # a task that did not come from get_task


def test_overhead_is_wall_minus_slowest_span(tmp_path):
    rows = [{"round": 0, "outcome": "complete", "wall": 10.0},
            {"round": 1, "outcome": "complete", "wall": 14.0, "reported": 2},
            {"round": 2, "outcome": "abandoned", "wall": 20.0},
            {"round": 3, "outcome": "complete", "wall": 25.0, "reported": 2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "nodes").mkdir()
    (tmp_path / "nodes" / "a.log").write_text(
        "x a: round 1 update sent (task to ack 3.000 s, download 0.100 s)\n"
        "x a: round 3 update sent (task to ack 4.500 s, download 0.200 s)\n")
    (tmp_path / "nodes" / "b.log").write_text(
        "x b: round 1 update sent (task to ack 3.600 s, download 0.300 s)\n"
        "x b: round 0 update sent\n")
    table = _bench().overhead(tmp_path)
    assert [t["round"] for t in table] == [1, 3]  # round 0 (joins) and the abandoned round left out
    one, three = table
    assert one["slowest_node"] == "b" and one["overhead"] == pytest.approx(0.4)
    assert one["share"] == pytest.approx(0.1)
    assert three["wall"] == pytest.approx(5.0) and three["overhead"] == pytest.approx(0.5)


def test_training_cpu_and_bound(tmp_path):
    rows = [{"round": 0, "outcome": "complete", "wall": 1.0}, {"round": 1, "outcome": "complete", "wall": 5.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "nodes").mkdir()
    for name, cpu in (("a", 1.0), ("b", 3.0)):
        (tmp_path / "nodes" / f"{name}.log").write_text(
            f"x {name}: round 1 update sent (task to ack 3.000 s, download 0.100 s, train {cpu:.3f} s CPU)\n")
    (t,) = _bench().overhead(tmp_path, cores=2)
    assert t["train_cpu"] == pytest.approx(4.0) and t["bound"] == pytest.approx(1.5 * 4.0 / 2 + 2.0)


def test_roomy_heap_evaluates_the_same_and_restores(monkeypatch):
    import torch

    from orchestrator import coordinator
    from orchestrator.evaluate import evaluate
    from fednode.workload.models import build_model
    from proto.layout import Layout

    calls = []

    class FakeLibc:  # records what roomy_heap asks of glibc (the real settings cannot be read back)
        def mallopt(self, what, value):
            calls.append((what, value))

        def malloc_trim(self, pad):
            calls.append(("trim", pad))

    model = build_model("mlp", (1, 8, 8), 10)
    layout = Layout.from_module(model)
    w = layout.flatten(model.state_dict()).clone()
    x, y = torch.randn(250, 1, 8, 8), torch.randint(0, 10, (250,))
    plain = evaluate(model, layout, w, x, y)
    monkeypatch.setattr(coordinator, "_glibc", lambda: FakeLibc())
    monkeypatch.setattr(coordinator, "_STEADY", False)
    with coordinator.roomy_heap():
        assert evaluate(model, layout, w, x, y) == plain
    assert calls == []  # without steady_heap's settings there is nothing to undo
    monkeypatch.setattr(coordinator, "_STEADY", True)
    with coordinator.roomy_heap():
        assert evaluate(model, layout, w, x, y) == plain
    M, T = coordinator.M_MMAP_THRESHOLD, coordinator.M_TRIM_THRESHOLD
    assert calls[:2] == [(M, 64 << 20), (T, 256 << 20)]
    assert calls[2:] == [(M, coordinator.STEADY_MMAP), (T, coordinator.GLIBC_TRIM), ("trim", 0)]
