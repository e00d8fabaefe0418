"""The long-poll waker (orchestrator/longpoll.py) and load-session roles (scenario checks)."""
from __future__ import annotations

import asyncio
import threading
import tomllib
from types import SimpleNamespace

import pytest

from orchestrator.longpoll import Waker
from orchestrator.rounds import RoundKeeper
from orchestrator.scenario import ScenarioError, from_dict


def loads(text):
    return from_dict(tomllib.loads(text))


def coord_with(keeper):
    return SimpleNamespace(keeper=keeper, shutdown=threading.Event())


def test_only_selected_nodes_of_an_open_round_wait_for_any_change():
    k = RoundKeeper()
    w = Waker(coord_with(k), 0.01)
    assert w.only_next_round("a")  # no round open
    k.open(0, 0, {"a"}, 10.0, 1.0)
    assert not w.only_next_round("a") and w.only_next_round("b")
    k.close_now("test")
    assert w.only_next_round("a")


def test_async_keepers_never_sleep_until_a_round():
    keeper = SimpleNamespace(current=None, buffer=[], version=0)
    assert not Waker(coord_with(keeper), 0.01).only_next_round("a")


def test_a_change_between_look_and_wait_is_not_missed_and_round_waiters_sleep_through_others():
    async def scenario():
        w = Waker(coord_with(RoundKeeper()), 0.01)
        seen = w.seen()
        w.fire(rounds=False)
        await asyncio.wait_for(w.wait(60, seen), 1)  # moved since `seen`: returns at once
        seen = w.seen()
        rounds_only = asyncio.ensure_future(w.wait(60, seen, rounds_only=True))
        any_change = asyncio.ensure_future(w.wait(60, seen))
        await asyncio.sleep(0.01)
        w.fire(rounds=False)
        await asyncio.wait_for(any_change, 1)
        await asyncio.sleep(0.01)
        assert not rounds_only.done()  # an upload arriving does not wake polls that wait for the next round
        w.fire(rounds=True)
        await asyncio.wait_for(rounds_only, 1)
        t = asyncio.get_running_loop().time()
        await w.wait(0.05, w.seen())  # nothing fires: the timeout ends it
        assert asyncio.get_running_loop().time() - t >= 0.04
        assert not w._any and not w._round  # every waiter left its set
    asyncio.run(scenario())


def test_the_waker_fires_when_a_round_opens():
    async def scenario():
        k = RoundKeeper()
        w = Waker(coord_with(k), 0.005)
        task = asyncio.ensure_future(w.run())
        await asyncio.sleep(0.03)
        seen = w.seen()
        waiting = asyncio.ensure_future(w.wait(60, seen, rounds_only=True))
        await asyncio.sleep(0.02)
        assert not waiting.done()
        k.open(0, 0, {"a"}, 10.0, 1.0)
        await asyncio.wait_for(waiting, 1)
        task.cancel()
    asyncio.run(scenario())


BASE = """
name = "t"
[federation]
rounds = 1
[[roles]]
name = "honest"
count = 3
"""


def test_load_roles_are_checked():
    s = loads(BASE + '[[roles]]\nname = "load"\ncount = 50\nload = true\n')
    assert s.num_nodes == 53 and s.num_trainers == 3
    assert [n for n, _ in s.trainer_roles()] == ["honest-000", "honest-001", "honest-002"]
    with pytest.raises(ScenarioError, match=r"roles\[1\]\.load.*Byzantine"):
        loads(BASE + '[[roles]]\nname = "load"\ncount = 5\nload = true\nbyzantine = true\n')
    with pytest.raises(ScenarioError, match=r"roles\[1\]\.load.*sync"):
        loads(BASE.replace("rounds = 1", 'rounds = 1\nmode = "async"') + '[[roles]]\nname = "l"\ncount = 5\nload = true\n')
    with pytest.raises(ScenarioError, match="not a load session"):
        loads('name = "t"\n[[roles]]\nname = "l"\ncount = 5\nload = true\n')
