"""The orchestrator's core parts without gRPC: row store, ingest path, aggregation pipeline."""
from __future__ import annotations

import threading

import pytest
import torch

from orchestrator.defenses import DefenseError, DefenseResult, build_defense
from orchestrator.errors import Refusal
from orchestrator.ingest import Ingest
from orchestrator.pipeline import AggregationPipeline, GlobalModel, Manifest
from orchestrator.collective import AggregationGroup
from orchestrator.rounds import RoundKeeper
from orchestrator.rowstore import RowStore, SealedError
from proto import codec
from proto.layout import Layout

D = 10


def _bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


# ----- row store ----------------------------------------------------------------------------

def test_complete_round_hands_over_the_buffer_itself():
    s = RowStore(D)
    s.open_round(["a", "b", "c"])
    for i, n in enumerate(["c", "a", "b"]):  # arrival order does not matter
        s.claim(n).write(0, _bytes(torch.full((D,), float(ord(n)))))
    s.seal()
    rows = s.take(["a", "b", "c"])
    assert rows.data_ptr() == s._buf.data_ptr() and rows.shape == (3, D)  # no copy, canonical order
    assert rows[:, 0].tolist() == [ord("a"), ord("b"), ord("c")]


def test_missing_rows_are_compacted_in_place_in_canonical_order():
    s = RowStore(D)
    s.open_round(["a", "b", "c", "d"])
    for n in ("b", "d"):
        s.claim(n).write(0, _bytes(torch.full((D,), float(ord(n)))))
    s.claim("c")  # started, never finished
    s.release("c")
    s.seal()
    rows = s.take(["b", "d"])
    assert rows.data_ptr() == s._buf.data_ptr()  # a view of the same buffer
    assert rows[:, 0].tolist() == [ord("b"), ord("d")] and rows.shape == (2, D)
    with pytest.raises(ValueError):
        s.take(["d", "b"])


def test_writes_after_seal_fail_and_touch_nothing():
    s = RowStore(D)
    s.open_round(["a", "b"])
    a, b = s.claim("a"), s.claim("b")
    a.write(0, _bytes(torch.ones(D)))
    s.seal()
    with pytest.raises(SealedError):
        b.write(0, _bytes(torch.full((D,), 9.0)))
    with pytest.raises(SealedError):
        s.claim("b")
    s.open_round(["a"])  # the next round: an old slot cannot write into the new buffer
    with pytest.raises(SealedError):
        a.write(0, _bytes(torch.full((D,), 7.0)))


def test_pool_reuses_the_lowest_free_slot_and_take_copies():
    s = RowStore(D)
    s.open_pool(3)
    slots = {n: s.claim(n) for n in ("x", "y", "z")}
    assert [slots[n].index for n in ("x", "y", "z")] == [0, 1, 2]
    for n, sl in slots.items():
        sl.write(0, _bytes(torch.full((D,), float(ord(n)))))
    with pytest.raises(RuntimeError):
        s.claim("w")  # exhausted: capacity is the most updates held at once
    s.release("y")
    assert s.claim("w").index == 1
    rows = s.take(["z", "x"])
    assert rows[:, 0].tolist() == [ord("z"), ord("x")] and rows.data_ptr() != s._buf.data_ptr()


# ----- ingest --------------------------------------------------------------------------------

def _ingest(selected=("a", "b")):
    keeper, store = RoundKeeper(), RowStore(D)
    store.open_round(sorted(selected))
    keeper.open(0, 0, set(selected), 30.0, 1.0)
    return keeper, store, Ingest(keeper, store, D)


def _chunks(t: torch.Tensor, size: int = 12):
    buf = codec.tensor_bytes(t)
    return codec.tensor_header(buf, (D,)), list(codec.iter_chunks(buf, size))


def test_ingest_decodes_into_the_row_and_records_the_upload():
    keeper, store, ingest = _ingest()
    delta = torch.linspace(-1, 1, D)
    header, chunks = _chunks(delta)
    up = ingest.receive(ingest.begin("a", 0, 0), header, iter(chunks), 7, lambda: False)
    assert up.num_samples == 7 and up.num_bytes == 4 * D
    assert torch.equal(store.row("a"), delta) and "a" in keeper.current.uploads


@pytest.mark.parametrize("mutate, reason", [
    ("crc", "checksum"), ("short", "invalid"), ("nan", "invalid"), ("long", "too_large")])
def test_a_refused_upload_gives_back_its_row_and_leaves_others_untouched(mutate, reason):
    keeper, store, ingest = _ingest()
    good = torch.arange(D, dtype=torch.float32)
    header, chunks = _chunks(good)
    ingest.receive(ingest.begin("b", 0, 0), header, iter(chunks), 1, lambda: False)
    bad = torch.ones(D)
    if mutate == "nan":
        bad[3] = float("nan")
    header, chunks = _chunks(bad)
    if mutate == "crc":
        header.crc32 ^= 1
    elif mutate == "short":
        chunks = chunks[:-1]
    elif mutate == "long":
        chunks = chunks + [b"\0\0\0\0"]
    with pytest.raises(Refusal) as e:
        ingest.receive(ingest.begin("a", 0, 0), header, iter(chunks), 1, lambda: False)
    assert e.value.reason == reason
    assert "a" not in keeper.current.uploads and "a" not in keeper.current.in_flight
    assert torch.equal(store.row("b"), good) and keeper.current.refused[reason] == 1
    # the node may try again (only a broken stream ends its part in the round)
    header, chunks = _chunks(torch.full((D,), 2.0))
    ingest.receive(ingest.begin("a", 0, 0), header, iter(chunks), 1, lambda: False)
    assert torch.equal(store.row("a"), torch.full((D,), 2.0))


def test_a_stream_cut_by_a_dead_client_ends_its_round():
    keeper, store, ingest = _ingest()
    header, chunks = _chunks(torch.ones(D))
    with pytest.raises(Refusal) as e:
        ingest.receive(ingest.begin("a", 0, 0), header, iter(chunks[:1]), 1, lambda: True)
    assert e.value.reason == "broken_stream" and "a" in keeper.current.broken
    with pytest.raises(Refusal) as e:
        ingest.begin("a", 0, 0)
    assert e.value.reason == "duplicate"


def test_an_upload_still_streaming_at_close_is_refused_as_stale():
    keeper, store, ingest = _ingest(("a", "b"))
    header, chunks = _chunks(torch.ones(D))
    receipt = ingest.begin("a", 0, 0)
    gate = threading.Event()

    def slow():
        yield chunks[0]
        gate.wait(5)
        yield from chunks[1:]

    header2, chunks2 = _chunks(torch.full((D,), 3.0))
    ingest.receive(ingest.begin("b", 0, 0), header2, iter(chunks2), 1, lambda: False)
    worker_error = []

    def run():
        try:
            ingest.receive(receipt, header, slow(), 1, lambda: False)
        except Refusal as r:
            worker_error.append(r)

    w = threading.Thread(target=run)
    w.start()
    keeper.current.deadline = 0  # close now, with "a" still in flight
    rnd = keeper.wait_close(lambda n: True)
    store.seal()
    rows = store.take(sorted(rnd.uploads))
    gate.set()
    w.join(5)
    assert worker_error and worker_error[0].reason == "stale"
    assert torch.equal(rows, torch.full((1, D), 3.0))  # the straggler's bytes never reached the rows


# ----- pipeline --------------------------------------------------------------------------------

def _pipeline(defense, records):
    layout = Layout.from_shapes([("w", (D,))])
    return AggregationPipeline(
        layout=layout, device=torch.device("cpu"), group=AggregationGroup(None), defense=defense, f=1,
        server_step=lambda delta, state, **kw: kw["lr"] * delta, server_lr=1.0, param_mask=None,
        evaluate=lambda w: (float(w.sum()), 0.0), model_fn=lambda: None,
        generator=lambda r: torch.Generator().manual_seed(r), num_nodes=3, byzantine=frozenset({"c"}),
        record=records.append)


def test_pipeline_defends_applies_evaluates_and_records():
    records = []
    model = GlobalModel(torch.zeros(D))
    rows = torch.stack([torch.full((D,), v) for v in (1.0, 2.0, 100.0)])
    ok = _pipeline(build_defense("median"), records).run(model, 0, rows, Manifest(("a", "b", "c"), (1, 1, 1)),
                                                         {"round": 0, "selected": 3, "byzantine_selected": 1})
    assert ok and model.version == 1 and torch.equal(model.weights, torch.full((D,), 2.0))
    assert records[0]["accuracy"] == pytest.approx(20.0) and records[0]["round"] == 0


def test_a_defense_error_skips_the_round_and_keeps_the_model():
    def failing(updates, ctx):
        raise DefenseError("krum needs n >= 2f + 3 = 5 clients, got 3")

    records = []
    model = GlobalModel(torch.ones(D))
    ok = _pipeline(failing, records).run(model, 4, torch.zeros(3, D), Manifest(("a", "b", "c"), (1, 1, 1)),
                                         {"round": 4})
    assert not ok and model.version == 0 and torch.equal(model.weights, torch.ones(D))
    assert records[0]["outcome"].startswith("skipped: krum needs")


def test_a_non_finite_aggregate_skips_the_round():
    def nan_rule(updates, ctx):
        return DefenseResult(delta=torch.full((D,), float("nan")), accepted=torch.ones(3, dtype=torch.bool))

    records = []
    model = GlobalModel(torch.ones(D))
    assert not _pipeline(nan_rule, records).run(model, 0, torch.zeros(3, D), Manifest(("a", "b", "c"), (1, 1, 1)),
                                                {"round": 0})
    assert model.version == 0 and records[0]["outcome"] == "skipped: defense returned non-finite delta"


# ----- untrusted sample counts ---------------------------------------------------------------

def test_claimed_counts_are_capped_at_the_assigned_shard_size():
    from orchestrator.pipeline import trusted_counts

    counts, capped = trusted_counts(["a", "b", "liar"], [100, 90, 2**62], {"a": 100, "b": 120, "liar": 110},
                                    "assigned", 2.0)
    assert counts == (100, 90, 110) and capped == ["liar"]  # claiming less is allowed, more is not


def test_median_mode_caps_claims_at_a_multiple_of_the_median():
    from orchestrator.pipeline import trusted_counts

    counts, capped = trusted_counts(["a", "b", "c", "liar"], [100, 120, 90, 2**62], {}, "median", 2.0)
    assert counts == (100, 120, 90, 200) and capped == ["liar"]
    # one liar can never outweigh the rest: its share is at most ratio / (ratio + n - 1) of the total
    assert counts[-1] / sum(counts) < 0.4
