"""Round and async keepers under churn: dropped phases, over-selection, broken streams,
late uploads, staleness. No network: the keepers are transport-free."""
from __future__ import annotations

import threading

import pytest
import torch

from orchestrator.async_mode import AsyncKeeper, staleness_weights
from orchestrator.errors import Refusal
from orchestrator.rounds import RoundKeeper, Upload
from orchestrator.selection import select


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _upload(node: str) -> Upload:
    return Upload(node, 1, 12, 0.0)


def test_dropped_phase_is_inferred_from_what_the_orchestrator_saw():
    clock = Clock()
    k = RoundKeeper(clock)
    k.open(0, 0, {"ok", "never", "trained", "mid"}, timeout=10, quorum=0.25)
    for n in ("ok", "trained", "mid"):
        k.mark_downloaded(n, 0)
    k.mark_downloaded("stranger", 0)  # not selected: ignored
    k.mark_downloaded("never", 7)  # another round: ignored
    k.finish_upload(k.begin_upload("ok", 0, 0), _upload("ok"))
    k.abort_upload(k.begin_upload("mid", 0, 0), "mid", "broken_stream")
    clock.t = 11
    closed = k.wait_close(lambda n: True)
    assert closed.outcome == "deadline"
    assert closed.dropped_phases() == {"never": "download", "trained": "train", "mid": "upload"}
    assert closed.refused == {"broken_stream": 1}
    assert len(closed.uploads) + len(closed.dropped_phases()) == len(closed.selected)


def test_over_selection_closes_at_the_target_and_refuses_the_rest_as_late():
    k = RoundKeeper(Clock())
    k.open(3, 1, {"a", "b", "c", "d"}, timeout=10, quorum=0.5, target=3)
    slow = k.begin_upload("d", 3, 1)  # in flight when the round reaches its target
    for n in ("a", "b", "c"):
        k.finish_upload(k.begin_upload(n, 3, 1), _upload(n))
    closed = k.wait_close(lambda n: True)
    assert closed.outcome == "target" and len(closed.uploads) == 3
    with pytest.raises(Refusal) as e:
        k.finish_upload(slow, _upload("d"))
    assert e.value.reason == "stale" and "closed" in e.value.message
    with pytest.raises(Refusal):
        k.begin_upload("d", 3, 1)  # a fresh attempt after the close
    assert k.drain_late() == 2 and k.drain_late() == 0
    assert k.open(4, 2, {"a"}, 10, 0.5, target=5).target == 0  # a target >= the selection means "all"


def test_a_broken_stream_ends_the_nodes_round_and_lets_it_close_early():
    k = RoundKeeper(Clock())
    k.open(0, 0, {"a", "b"}, timeout=100, quorum=0.5)
    k.finish_upload(k.begin_upload("a", 0, 0), _upload("a"))
    k.abort_upload(k.begin_upload("b", 0, 0), "b", "broken_stream")
    # b is alive again (restarted, re-joined) but will not be offered the round again
    assert k.task_for("b") is None
    closed = k.wait_close(lambda n: True)
    assert closed.outcome == "dead-nodes" and closed.dropped_phases() == {"b": "upload"}


def test_a_refused_but_unbroken_upload_may_be_retried():
    k = RoundKeeper(Clock())
    r = k.open(0, 0, {"a"}, timeout=10, quorum=1.0)
    k.abort_upload(k.begin_upload("a", 0, 0), "a", "checksum")
    assert k.task_for("a") is r
    k.finish_upload(k.begin_upload("a", 0, 0), _upload("a"))
    assert k.wait_close(lambda n: True).outcome == "complete"


def test_over_selection_draws_more_nodes():
    alive = [f"n{i}" for i in range(50)]
    g = torch.Generator().manual_seed(0)
    assert len(select(alive, "sample", 20, g, over_selection=1.3)) == 26
    assert len(select(alive[:10], "sample", 20, g, over_selection=1.3)) == 10


# --------------------------------------------------------------------------- async

def _async(buffer_size: int = 2, max_staleness: int = 1) -> AsyncKeeper:
    k = AsyncKeeper(buffer_size, max_staleness, task_seconds=30, clock=Clock())
    k.publish(0, 0, b"v0")
    return k


def test_async_serves_the_latest_model_to_idle_nodes_only():
    k = _async()
    t = k.wait_task("a", 0.0)
    assert t.model_version == 0 and t.payload == b"v0" and t.num_selected == 2
    ticket = k.begin_upload("a", 0, 0)
    assert k.task_for("a") is None  # upload in flight
    k.finish_upload(ticket, _upload("a"))
    assert k.task_for("a") is None  # its update waits in the buffer
    with pytest.raises(Refusal) as e:
        k.begin_upload("a", 0, 0)
    assert e.value.reason == "duplicate"
    k.finish_upload(k.begin_upload("b", 0, 0), _upload("b"))
    taken, outcome, facts = k.wait_buffer(1.0, 1.0, threading.Event(), lambda n: True)
    assert outcome == "complete" and [b.upload.node_id for b in taken] == ["a", "b"]
    assert [b.staleness for b in taken] == [0, 0] and facts["tasks_served"] == 1
    k.publish(1, 1, b"v1")
    assert k.task_for("a").payload == b"v1"


def test_async_refuses_over_stale_uploads_with_a_clear_message():
    k = _async(max_staleness=1)
    old = k.begin_upload("slow", 0, 0)  # header accepted at version 0
    k.publish(1, 1, b"v1")
    k.publish(2, 2, b"v2")
    k.finish_upload(k.begin_upload("a", 2, 1), _upload("a"))  # staleness 1: accepted
    with pytest.raises(Refusal) as e:  # the stream completes too late
        k.finish_upload(old, _upload("slow"))
    assert e.value.reason == "stale"
    assert e.value.message == "stale: based on version 0, current 2, max staleness 1"
    with pytest.raises(Refusal) as e:  # and a new header based on it is refused at once
        k.begin_upload("b", 2, 0)
    assert e.value.message.startswith("stale: based on version 0, current 2")
    with pytest.raises(Refusal):
        k.begin_upload("b", 2, 3)  # a version from the future
    k.count_refusal("stale")
    taken, outcome, facts = k.wait_buffer(0.0, 0.5, threading.Event(), lambda n: True)
    assert outcome == "deadline" and [b.staleness for b in taken] == [1]  # quorum of B=2 is 1
    assert facts["refused"] == {"stale": 1}


def test_async_abandons_below_quorum_and_counts_lost_tasks_by_phase():
    k = _async(buffer_size=3)
    for n in ("a", "b", "c"):
        k.wait_task(n, 0.0)
    k.mark_downloaded("b", 0)
    k.abort_upload(k.begin_upload("c", 0, 0), "c", "broken_stream")
    taken, outcome, facts = k.wait_buffer(0.0, 1.0, threading.Event(), lambda n: False)
    assert taken == [] and outcome.startswith("abandoned: 0 of 3 buffered")
    assert facts["dropped"] == {"download": 1, "train": 1, "upload": 1}
    assert facts["refused"] == {"broken_stream": 1}


def test_staleness_weights():
    assert staleness_weights([0, 3], "constant", 0.5).tolist() == [1.0, 1.0]
    w = staleness_weights([0, 3, 8], "polynomial", 0.5)
    assert torch.allclose(w, torch.tensor([1.0, 0.5, 1 / 3]))
    with pytest.raises(ValueError):
        staleness_weights([0], "exponential", 1.0)
