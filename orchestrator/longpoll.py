"""Waking ``GetTask`` long-polls without waking all of them.

Every waiting poll used to wake on any change of the ledger (an upload arriving, a
download starting) and at least four times a second on its own. With thousands of
sessions polling (``bench/sessions.py``) that herd was most of the orchestrator's
event loop: every change resumed every waiter. Now:

* the :class:`Waker` keeps two generations, compared every ``period`` seconds from
  cheap signatures of the ledger: **any** change (the open round, its closing and
  in-flight count, the async version, step and buffer, shutdown), and **round**
  changes only (a round opened or closed, shutdown);
* a poll whose node cannot get a task before the next round (synchronous rounds: no
  round open, the round closed, or the node not selected in it) waits for a round
  change; any other poll waits for any change, and re-checks on its own every
  :data:`RECHECK_SECONDS` in case a change escaped the signature (latency, never a
  lost task);
* a waiter reads the generation before it looks at the ledger and returns at once
  if it moved meanwhile, so a change between its look and its wait is never missed;
* a wait is one future and one timer on the loop (no task per wait).
"""
from __future__ import annotations

import asyncio
from typing import Any

RECHECK_SECONDS = 2.0
"""How often a poll that may get a task in the open round re-checks on its own."""


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class Waker:
    def __init__(self, coord: Any, period: float) -> None:
        self.coord = coord
        self.period = period
        self.any_gen = 0
        self.round_gen = 0
        self._any: set[asyncio.Future] = set()
        self._round: set[asyncio.Future] = set()

    def _signatures(self) -> tuple[tuple, tuple]:
        k = self.coord.keeper
        cur = getattr(k, "current", None)
        stop = self.coord.shutdown.is_set()
        rounds = (id(k), id(cur), getattr(cur, "round_id", None), getattr(cur, "closed", None), stop)
        every = rounds + (len(getattr(cur, "in_flight", ()) or ()), getattr(k, "version", None),
                          getattr(k, "step", None), id(getattr(k, "buffer", None)), len(getattr(k, "buffer", ()) or ()),
                          len(getattr(k, "in_flight", ()) or ()), getattr(k, "closed", None))
        return every, rounds

    def only_next_round(self, node_id: str) -> bool:
        """Whether ``node_id`` cannot get a task before the next round opens (synchronous
        rounds: none open, the open one closed, or the node not selected in it)."""
        k = self.coord.keeper
        if not hasattr(k, "current") or hasattr(k, "buffer"):  # (async: any idle node may get the next task)
            return False
        cur = k.current
        return cur is None or bool(getattr(cur, "closed", False)) or node_id not in cur.selected

    def fire(self, rounds: bool) -> None:
        """Wake the waiters of any change (and of round changes when ``rounds``)."""
        self.any_gen += 1
        waiters, self._any = self._any, set()
        if rounds:
            self.round_gen += 1
            more, self._round = self._round, set()
            waiters |= more
        for fut in waiters:
            _wake(fut)

    async def run(self) -> None:
        last = last_round = None
        while True:
            try:
                every, rounds = self._signatures()
            except Exception:  # a ledger being swapped (use_layout) or torn down: look again next time
                every = rounds = None
            if every != last or rounds != last_round or every is None:
                self.fire(rounds != last_round or rounds is None)
                last, last_round = every, rounds
            await asyncio.sleep(self.period)

    def seen(self) -> tuple[int, int]:
        """The generations now: read before looking at the ledger, pass to :meth:`wait`."""
        return self.any_gen, self.round_gen

    async def wait(self, timeout: float, seen: tuple[int, int], rounds_only: bool = False) -> None:
        """Until the next change after ``seen`` (a round change when ``rounds_only``), or
        ``timeout`` seconds."""
        if (self.round_gen != seen[1]) if rounds_only else (self.any_gen != seen[0]):
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        waiters = self._round if rounds_only else self._any
        waiters.add(fut)
        timer = loop.call_later(max(0.0, timeout), _wake, fut)
        try:
            await fut
        finally:
            timer.cancel()
            waiters.discard(fut)
