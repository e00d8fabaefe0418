"""The gRPC edge's limits without a network: field checks, parsing, echoes, admission
(caps, evictions, the first-message reaper), the ledgers' upload nonces, incremental
upload sessions and the join checks of membership."""
from __future__ import annotations

import asyncio
import logging
import math

import grpc
import pytest
import torch

from orchestrator.async_mode import AsyncKeeper
from orchestrator.errors import Refusal
from orchestrator.ingest import Ingest
from orchestrator.membership import Membership, NameTaken
from orchestrator.rounds import RoundKeeper, Upload
from orchestrator.rowstore import RowStore
from orchestrator.servicer import (MAX_WAIT_SECONDS, Admission, EdgeRefusal, Limits, check_join,
                                   check_update_header, check_wait, echo, parse)
from proto import codec
from proto.byzfed.v1 import federation_pb2 as pb

C = grpc.StatusCode
D = 8


# ----- fields and parsing ------------------------------------------------------------------

def test_limits_refuse_nonsense():
    for bad in ({"first_message_seconds": 0.0}, {"idle_seconds": math.nan}, {"tasks_per_node": 0},
                {"max_join_bytes": -1}, {"max_calls": -1}, {"poll_seconds": math.inf}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Limits(**bad)
    assert Limits().total_calls(10) == 256 and Limits().total_calls(1000) == 4000
    assert Limits(max_calls=7).total_calls(1000) == 7


@pytest.mark.parametrize("wait", [math.nan, math.inf, -math.inf, -1.0, -1e-9, 3600.5, 1e300])
def test_wait_seconds_nan_negative_or_huge_is_invalid(wait):
    with pytest.raises(EdgeRefusal) as e:
        check_wait(wait, Limits())
    assert e.value.code == C.INVALID_ARGUMENT and "wait_seconds" in e.value.message


def test_wait_seconds_in_range_is_clamped():
    assert check_wait(0.0, Limits()) == 0.0 and check_wait(3.5, Limits()) == 3.5
    assert check_wait(600.0, Limits()) == MAX_WAIT_SECONDS


def test_parse_refuses_oversized_and_undecodable_requests():
    good = pb.JoinRequest(credentials=pb.Credentials(node_name="ab", node_secret="s", federation_token="t"))
    raw = good.SerializeToString()
    assert parse(pb.JoinRequest, raw, 1024, "max_join_bytes") == good
    with pytest.raises(EdgeRefusal) as e:
        parse(pb.JoinRequest, raw, 10, "max_join_bytes")
    assert e.value.code == C.RESOURCE_EXHAUSTED and "max_join_bytes" in e.value.message
    with pytest.raises(EdgeRefusal) as e:  # a node name that is not UTF-8
        parse(pb.JoinRequest, raw.replace(b"ab", b"\xff\xfe"), 1024, "max_join_bytes")
    assert e.value.code == C.INVALID_ARGUMENT and "not UTF-8" in e.value.message
    with pytest.raises(EdgeRefusal) as e:
        parse(pb.JoinRequest, b"\x0a\x7f", 1024, "max_join_bytes")  # a truncated field
    assert e.value.code == C.INVALID_ARGUMENT


def test_echo_never_repeats_unbounded_input():
    assert echo("short") == "'short'"
    long = echo("x" * 7_000_000)
    assert len(long) < 80 and "7000000 chars" in long


def test_join_and_header_field_checks():
    lim = Limits()
    ok = pb.JoinRequest(credentials=pb.Credentials(node_name="n", node_secret="s"), num_samples=3, cpu_cores=2)
    check_join(ok, lim)
    for field, req in [("node_name", pb.JoinRequest(credentials=pb.Credentials(node_name="n" * 129))),
                       ("node_secret", pb.JoinRequest(credentials=pb.Credentials(node_secret="s" * 257))),
                       ("device", pb.JoinRequest(device="d" * 129)),
                       ("num_samples", pb.JoinRequest(num_samples=-1)),
                       ("cpu_cores", pb.JoinRequest(cpu_cores=-2))]:
        with pytest.raises(EdgeRefusal) as e:
            check_join(req, lim)
        assert e.value.code == C.INVALID_ARGUMENT and field in e.value.message and len(e.value.message) < 200
    h = pb.UpdateHeader(round=1, model_version=1, num_samples=5, tensor=pb.TensorHeader(dtype="float32"))
    check_update_header(h, lim)
    for field, over in [("round", {"round": -1}), ("model_version", {"model_version": -3}),
                        ("num_samples", {"num_samples": 0}), ("layout_hash", {"layout_hash": "h" * 200}),
                        ("upload_nonce", {"upload_nonce": "z" * 200})]:
        bad = pb.UpdateHeader()
        bad.CopyFrom(h)
        for k, v in over.items():
            setattr(bad, k, v)
        with pytest.raises(EdgeRefusal) as e:
            check_update_header(bad, lim)
        assert e.value.code == C.INVALID_ARGUMENT and field in e.value.message
    bad = pb.UpdateHeader()
    bad.CopyFrom(h)
    bad.tensor.dtype = "f" * 5000
    with pytest.raises(EdgeRefusal) as e:
        check_update_header(bad, lim)
    assert "tensor.dtype" in e.value.message and len(e.value.message) < 200


# ----- admission ---------------------------------------------------------------------------

def _run(coro):
    return asyncio.run(coro)


async def _held(enter):
    """A call held open in its own task: ``(ticket, task)`` (an eviction cancels the task)."""
    got = asyncio.get_running_loop().create_future()

    async def call():
        got.set_result(enter())
        await asyncio.Event().wait()

    task = asyncio.create_task(call())
    return await got, task


def test_unauthenticated_streams_over_the_cap_evict_the_oldest():
    async def main():
        adm = Admission(Limits(max_unauthenticated_streams=3), 4)
        waiting = [asyncio.get_running_loop().create_future() for _ in range(4)]
        tickets = []

        async def stream(i):
            tickets.append(adm.enter_preauth())
            try:
                await waiting[i]
            except asyncio.CancelledError:
                return "cancelled"

        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(stream(i)))
            await asyncio.sleep(0)
        done = await asyncio.gather(tasks[0])
        assert done == ["cancelled"] and "max_unauthenticated_streams = 3" in tickets[0].evicted
        assert adm.preauth == 3 and adm.preauth_max == 3 and not tickets[1].evicted
        for t in tasks[1:]:
            t.cancel()
        await asyncio.gather(*tasks[1:], return_exceptions=True)
    _run(main())


def test_first_message_reaper_cuts_oldest_first_and_at_a_bounded_rate():
    async def main():
        adm = Admission(Limits(first_message_seconds=1.0), 1)
        held = [await _held(adm.enter_preauth) for _ in range(10)]
        tickets = [t for t, _ in held]
        now = tickets[-1].started
        assert adm.reap_preauth(now + 0.5, 100) == 0  # none is late yet
        assert adm.reap_preauth(now + 1.0, 4) == 4  # at most 4 per tick, oldest first
        assert [bool(t.evicted) for t in tickets] == [True] * 4 + [False] * 6
        assert "first_message_seconds = 1 s" in tickets[0].evicted
        assert adm.reap_preauth(now + 1.0, 100) == 6 and adm.preauth == 0
        assert adm.counts["cut:first_message_seconds"] == 10
        await asyncio.sleep(0)
        assert all(task.cancelled() for _, task in held)
    _run(main())


def test_per_node_caps_evict_old_polls_and_refuse_extra_uploads():
    async def main():
        lim = Limits(tasks_per_node=2, uploads_per_node=1, evict_seconds=60.0)
        adm = Admission(lim, 2)
        (a1, t1), (a2, _) = await _held(lambda: adm.enter("a", "task")), await _held(lambda: adm.enter("a", "task"))
        a3, _ = await _held(lambda: adm.enter("a", "task"))  # evicts the oldest: the one an honest node waits on is the newest
        assert "tasks_per_node = 2" in a1.evicted and not a2.evicted and adm.total == 2
        await asyncio.sleep(0)
        assert t1.cancelled()
        with pytest.raises(EdgeRefusal) as e:  # a second eviction within evict_seconds: refused, later
            adm.enter("a", "task")
        assert e.value.code == C.RESOURCE_EXHAUSTED and "tasks_per_node" in e.value.message
        assert e.value.delay == lim.refusal_delay_seconds
        await _held(lambda: adm.enter("b", "task"))  # other nodes are not affected
        u, _ = await _held(lambda: adm.enter("a", "upload"))
        with pytest.raises(EdgeRefusal) as e:
            adm.enter("a", "upload")
        assert "uploads_per_node = 1" in e.value.message
        for t in (a2, a3, u):
            adm.leave(t)
        adm.leave(a2)  # leaving twice is harmless
        assert adm.total == 1
        assert adm.counts["evicted:tasks_per_node"] == 1 and adm.counts["refused:uploads_per_node"] == 1
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
    _run(main())


def test_total_cap_refuses_with_the_limit_named():
    async def main():
        adm = Admission(Limits(max_calls=2), 10)
        await _held(lambda: adm.enter("a", "task")), await _held(lambda: adm.enter("b", "task"))
        with pytest.raises(EdgeRefusal) as e:
            adm.enter("c", "upload")
        assert e.value.code == C.RESOURCE_EXHAUSTED and "max_calls = 2" in e.value.message
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
    _run(main())


# ----- nonces in the ledgers -----------------------------------------------------------------

def test_sync_uploads_must_echo_their_rounds_nonce():
    k = RoundKeeper()
    r0 = k.open(0, 0, {"a", "b"}, 30.0, 1.0)
    n0 = r0.nonce_of("a")
    assert len(n0) == 32 and n0 != r0.nonce_of("b")
    for sent, words in [("", "carries no upload_nonce"), ("f" * 32, "does not match"), (r0.nonce_of("b"), "does not match")]:
        with pytest.raises(Refusal) as e:
            k.begin_upload("a", 0, 0, sent)
        assert e.value.reason == "permission_denied" and words in e.value.message
    k.finish_upload(k.begin_upload("a", 0, 0, n0), Upload("a", 1, 4, 0.0))
    k.finish_upload(k.begin_upload("b", 0, 0, r0.nonce_of("b")), Upload("b", 1, 4, 0.0))
    k.wait_close(lambda n: True)
    r1 = k.open(1, 1, {"a", "b"}, 30.0, 1.0)
    with pytest.raises(Refusal) as e:  # round 0's upload re-sent with round and version rewritten
        k.begin_upload("a", 1, 1, n0)
    assert e.value.reason == "permission_denied" and "replayed" in e.value.message
    assert k.begin_upload("a", 1, 1, r1.nonce_of("a")) is r1
    assert k.begin_upload("b", 1, 1) is r1  # None: an in-process caller, no check


def test_async_tickets_carry_a_nonce_used_up_by_the_accepted_upload():
    k = AsyncKeeper(buffer_size=1, max_staleness=3, task_seconds=30.0)
    k.publish(0, 0, b"w" * 4)
    t = k.wait_task("a", 0.0)
    assert t is not None and len(t.nonce) == 32 and t.nonce_of("a") == t.nonce
    with pytest.raises(Refusal) as e:
        k.begin_upload("a", 0, 0, "")
    assert e.value.reason == "permission_denied"
    k.finish_upload(k.begin_upload("a", 0, 0, t.nonce), Upload("a", 1, 4, 0.0))
    taken, outcome, _ = k.wait_buffer(0.1, 1.0, _never(), lambda n: True)
    assert outcome == "complete" and len(taken) == 1
    k.publish(1, 1, b"v" * 4)
    for version in (0, 1):  # the same upload again, as it was or with its version rewritten
        with pytest.raises(Refusal) as e:
            k.begin_upload("a", 1, version, t.nonce)
        assert e.value.reason == "permission_denied" and "used or never issued" in e.value.message
    t2 = k.wait_task("a", 0.0)
    with pytest.raises(Refusal) as e:  # the new ticket's nonce with another version
        k.begin_upload("a", 1, 0, t2.nonce)
    assert "trains model version 1" in e.value.message
    k.begin_upload("a", 1, 1, t2.nonce)


def _never():
    import threading
    return threading.Event()


# ----- incremental upload sessions -------------------------------------------------------------

def _ingest():
    keeper, store = RoundKeeper(), RowStore(D)
    store.open_round(["a", "b"])
    r = keeper.open(0, 0, {"a", "b"}, 30.0, 1.0)
    return keeper, store, Ingest(keeper, store, D), r


def test_session_fed_chunk_by_chunk_records_the_row():
    keeper, store, ingest, r = _ingest()
    delta = torch.linspace(-1, 1, D)
    buf = codec.tensor_bytes(delta)
    s = ingest.session(ingest.begin("a", 0, 0, r.nonce_of("a")), codec.tensor_header(buf, (D,)), 3)
    for c in codec.iter_chunks(buf, 5):
        s.add(c)
    assert not s.short
    up = s.finish()
    assert up.num_samples == 3 and torch.equal(store.row("a"), delta) and "a" in keeper.current.uploads
    s.abort("idle")  # closed: a no-op
    assert "a" in keeper.current.uploads


def test_an_idle_session_aborted_keeps_nothing_and_the_node_may_retry():
    keeper, store, ingest, r = _ingest()
    buf = codec.tensor_bytes(torch.ones(D))
    s = ingest.session(ingest.begin("a", 0, 0), codec.tensor_header(buf, (D,)), 1)
    s.add(bytes(buf[:8]))
    assert s.short
    s.abort("idle")
    rnd = keeper.current
    assert "a" not in rnd.in_flight and "a" not in rnd.broken and rnd.refused == {"idle": 1}
    with pytest.raises(Refusal):
        s.add(bytes(buf[8:]))
    s2 = ingest.session(ingest.begin("a", 0, 0), codec.tensor_header(buf, (D,)), 1)
    s2.add(bytes(buf))
    s2.finish()
    assert torch.equal(store.row("a"), torch.ones(D))


def test_session_refusals_give_everything_back():
    keeper, store, ingest, r = _ingest()
    buf = codec.tensor_bytes(torch.ones(D))
    with pytest.raises(Refusal) as e:  # a bad dtype is refused at once
        ingest.session(ingest.begin("a", 0, 0), pb.TensorHeader(dtype="float64", num_bytes=4 * D), 1)
    assert e.value.reason == "invalid" and "a" not in keeper.current.in_flight
    s = ingest.session(ingest.begin("a", 0, 0), codec.tensor_header(buf, (D,)), 1)
    s.add(bytes(buf))
    with pytest.raises(Refusal) as e:
        s.add(b"\0\0\0\0")
    assert e.value.reason == "too_large" and "a" not in keeper.current.in_flight
    assert keeper.current.refused == {"invalid": 1, "too_large": 1}


# ----- membership ------------------------------------------------------------------------------

def test_the_federation_token_is_checked_before_anything_else():
    m = Membership("fed", 10.0)
    for name in ("", "x" * 10_000, "not-in-any-roster"):
        with pytest.raises(Refusal) as e:
            m.join(name, "", "wrong", 1, 0)
        assert e.value.reason == "unauthenticated" and e.value.message == "federation token is wrong"
    m.check_token("fed")
    with pytest.raises(Refusal):
        m.check_token("fe")


def test_a_name_conflict_is_refused_counted_and_logged_once_a_minute(caplog):
    clock = [0.0]
    m = Membership("fed", 10.0, clock=lambda: clock[0])
    first, _ = m.join("honest-001", "attacker", "fed", 1, 0)
    caplog.set_level(logging.WARNING, logger="orchestrator.membership")
    for _ in range(3):
        with pytest.raises(NameTaken) as e:
            m.join("honest-001", "real-secret", "fed", 1, 0)
        assert e.value.reason == "unauthenticated" and "taken by another holder of the federation token" in e.value.message
    clock[0] = 61.0
    with pytest.raises(NameTaken):
        m.join("honest-001", "real-secret", "fed", 1, 0)
    assert m.name_conflicts == {"honest-001": 4}
    warnings = [r.getMessage() for r in caplog.records if r.name == "orchestrator.membership"]
    assert len(warnings) == 2 and all("'honest-001'" in w and "other credentials was refused" in w for w in warnings)
    assert first.node_id in warnings[0] and "4 such join(s)" in warnings[1]
    again, rejoined = m.join("honest-001", "attacker", "fed", 1, 0)  # the holder itself re-joins as before
    assert rejoined and again.node_id == first.node_id
