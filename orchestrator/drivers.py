"""The drivers: the loop that selects, opens, waits, closes and hands the manifest
to the aggregation pipeline. ``SyncRounds`` drives synchronous rounds over the
round ledger (``rounds.RoundKeeper``); ``AsyncRounds`` drives buffered
asynchronous steps over ``async_mode.AsyncKeeper``. Both use only the public
parts of the coordinator (membership, ledger, row store, pipeline, model).
"""
from __future__ import annotations

import time
from typing import Any

from . import failpoints
from .async_mode import AsyncKeeper, staleness_weights
from .pipeline import manifest_of
from .selection import select


class Driver:
    def __init__(self, coord: Any) -> None:
        self.c = coord  # the ``coordinator.Coordinator`` that built this driver (it imports this module)

    def await_joiners(self, r_id: int) -> None:
        """Nodes started for round ``r_id`` (join_at_round, rejoin_at_round) take part in it:
        wait for them to join before selecting, at most ``federation.join_timeout``."""
        c = self.c
        names = c.await_joiners.pop(r_id, set())
        end = time.monotonic() + c.s.federation.join_timeout
        while names and time.monotonic() < end and not c.shutdown.is_set():
            if names <= {m.name for m in c.membership.alive()}:
                return
            time.sleep(0.05)

    def membership_row(self, r_id: int) -> dict[str, Any]:
        """The start of a metrics row: membership now and the joins/leaves since the last row."""
        c = self.c
        events = c.membership.drain_events()
        row = {"round": r_id, "model_version": c.model.version, "alive": len(c.membership.alive()),
               "joined": [c.name_of(n) for e, n in events if e == "join"],
               "left": [c.name_of(n) for e, n in events if e == "leave"],
               "evicted": [c.name_of(n) for e, n in events if e == "evict"]}
        revoked = [c.name_of(n) for e, n in events if e == "revoked"]  # (evicted with reason "revoked")
        if revoked:
            row["evicted_revoked"] = revoked
        return row

    def manifest(self, uploads: list, row: dict[str, Any]):
        """The pipeline's manifest of ``uploads``, with self-reported sample counts capped
        (``pipeline.trusted_counts``); names whose claim was cut go into the row."""
        fed = self.c.s.federation
        manifest, capped = manifest_of(uploads, self.c.name_of, self.c.assigned_counts, fed.sample_counts,
                                       fed.count_cap)
        if capped:
            row["counts_capped"] = capped
        return manifest

    def step(self) -> None:
        raise NotImplementedError


class SyncRounds(Driver):
    """One synchronous round per :meth:`step`."""

    def step(self) -> None:
        c, fed = self.c, self.c.s.federation
        r_id = c.round_id
        self.await_joiners(r_id)
        # with nobody alive (e.g. all evicted by a network cut) give nodes a deadline to come back
        end = time.monotonic() + fed.round_timeout
        while not c.membership.alive() and time.monotonic() < end and not c.shutdown.is_set():
            time.sleep(0.1)
        c.evict_expired()  # a node whose lease just ran out is never selected
        alive = c.membership.alive()
        names = {m.node_id: m.name for m in alive if m.name not in c.load_names}
        selected = select(list(names), fed.selection, fed.sample_size, c.generator(r_id, "select"),
                          over_selection=fed.over_selection)
        row = self.membership_row(r_id)
        row.update(alive=len(names), selected=len(selected), selected_nodes=sorted(names[n] for n in selected))
        if c.load_names:  # (load sessions: members, never selected; not in "alive")
            row["load_sessions_alive"] = len(alive) - len(names)
        if not selected:
            row.update(outcome="abandoned: no node alive", reported=0)
            c.record_row(row)
            return
        c.weights_payload(c.model.version)
        t0 = time.monotonic()
        # over-selection: close once sample_size reported; the rest are refused as late
        target = fed.sample_size if fed.selection == "sample" and fed.over_selection > 1 else 0
        # (announced first: the collusion service learns the round's colluders before any task is out)
        c.on_event("round_open", {"round": r_id, "selected": [names[n] for n in selected]})
        c.open_round(r_id, set(selected), fed.round_timeout, fed.quorum, target=target)
        rnd = c.keeper.wait_close(c.membership.is_alive)
        c.store.seal()
        if c.leader is not None:
            c.leader.seal(rnd)  # the other ranks' last uploads, and no more anywhere
        t_collect = time.monotonic() - t0
        uploads = [rnd.uploads[n] for n in sorted(rnd.uploads)]
        phases = {c.name_of(n): p for n, p in rnd.dropped_phases().items()}
        row.update(outcome=rnd.outcome, reported=len(uploads), quorum=rnd.quorum,
                   missing=sorted(phases), refused=dict(rnd.refused),
                   dropped={p: sum(1 for v in phases.values() if v == p) for p in ("download", "train", "upload")},
                   dropped_at=dict(sorted(phases.items())),
                   late=sum(1 for n in rnd.missing if c.membership.is_alive(n) and n not in rnd.broken),
                   bytes_received=sum(u.num_bytes for u in uploads), t_collect=round(t_collect, 4))
        row["byzantine_selected"] = sum(1 for n in selected if c.name_of(n) in c.byzantine_names)
        try:
            if rnd.outcome.startswith("abandoned"):
                if c.leader is not None:
                    c.leader.gather(rnd, [], [])
                c.record_row(row)
                return
            manifest = self.manifest(uploads, row)
            ids = [u.node_id for u in uploads]
            t1 = time.monotonic()
            if c.leader is None:
                result = c.pipeline.defend(c.model, r_id, c.store.take(ids), manifest)
            else:  # every rank gathers the rows and runs the defense's share of the work
                with c.leader.commands.lock:
                    rows = c.leader.gather(rnd, ids, list(manifest.num_samples))
                    result = c.leader.commands.call(c.pipeline.defend, c.model, r_id, rows, manifest)
            failpoints.reached("aggregate", r_id)
            c.pipeline.apply(c.model, result, manifest, row, time.monotonic() - t1)
        finally:
            c.store.drop()


class AsyncRounds(Driver):
    """One buffered asynchronous aggregation per :meth:`step` (see ``async_mode``)."""

    def __init__(self, coord: Any) -> None:
        super().__init__(coord)
        self.keeper: AsyncKeeper = coord.keeper
        coord.store.open_pool(len(coord.roster))  # each node holds at most one update at a time
        self.keeper.publish(coord.round_id, coord.model.version, coord.weights_payload(coord.model.version))

    def step(self) -> None:
        c, fed = self.c, self.c.s.federation
        r_id = c.round_id
        self.await_joiners(r_id)
        t0 = time.monotonic()
        taken, outcome, facts = self.keeper.wait_buffer(fed.round_timeout, fed.quorum, c.shutdown,
                                                        c.membership.is_alive)
        row = self.membership_row(r_id)
        row.update(mode="async", outcome=outcome, reported=len(taken), selected=len(taken),
                   buffer_size=fed.buffer_size, refused=facts["refused"], tasks_served=facts["tasks_served"],
                   dropped=facts["dropped"], buffered_after=facts["buffered_after"],
                   t_collect=round(time.monotonic() - t0, 4))
        if not taken:
            c.record_row(row)
            return
        staleness = [b.staleness for b in taken]
        weights = staleness_weights(staleness, fed.staleness_weighting, fed.staleness_exponent)
        row.update(staleness=staleness, staleness_mean=round(sum(staleness) / len(staleness), 4),
                   staleness_max=max(staleness), staleness_weights=[round(float(w), 4) for w in weights])
        uploads = [b.upload for b in taken]
        row["selected_nodes"] = sorted(c.name_of(u.node_id) for u in uploads)
        row["byzantine_selected"] = sum(1 for n in row["selected_nodes"] if n in c.byzantine_names)
        node_ids = [u.node_id for u in uploads]
        try:
            rows = c.store.take(node_ids)
        finally:
            for n in node_ids:
                c.store.release(n)
        manifest = self.manifest(uploads, row)
        t1 = time.monotonic()
        result = c.pipeline.defend(c.model, r_id, rows, manifest, weights)
        failpoints.reached("aggregate", r_id)  # (a kill here: the defense ran, its step is not applied)
        c.pipeline.apply(c.model, result, manifest, row, time.monotonic() - t1)
        self.keeper.publish(c.round_id + 1, c.model.version, c.weights_payload(c.model.version))
