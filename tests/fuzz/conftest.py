"""Fixtures of the fuzz suite: the live federation and the run's budget.

Every fuzz test runs twice over: once in the default run (derandomized: the same
cases every time, no shrinking, a budget that keeps the whole suite near two minutes
on two cores) and once as its ``fuzz_long`` twin, skipped unless selected::

    ./launch.sh test tests/fuzz                 # the default, seeded budget
    ./launch.sh test -m fuzz_long               # BYZFED_FUZZ_SCALE (20) x the cases, random seed, shrinking
    BYZFED_FUZZ_SCALE=100 BYZFED_FUZZ_SEED=7 ./launch.sh test -m fuzz_long -k upload

A ``fuzz_long`` failure prints its seed (``BYZFED_FUZZ_SEED``) and hypothesis's
shrunk example, so it can be replayed.
"""
from __future__ import annotations

import os
import random
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, Phase, seed, settings

from .live import LiveFederation

SCALE = float(os.environ.get("BYZFED_FUZZ_SCALE", "20"))
"""fuzz_long runs: this many times each test's default number of cases."""
DEFAULT_SEED = 20261201


def pytest_collection_modifyitems(config, items):
    if "fuzz_long" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="long fuzz run: select it with -m fuzz_long")
    for item in items:
        if item.get_closest_marker("fuzz_long") is not None:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    from .live import TALLY

    if not TALLY:
        return
    by_rpc: dict[str, list[str]] = {}
    for (rpc, code), n in sorted(TALLY.items()):
        by_rpc.setdefault(rpc, []).append(f"{code} {n}")
    terminalreporter.write_sep("-", f"fuzz calls: {sum(TALLY.values())}")
    for rpc, parts in by_rpc.items():
        terminalreporter.write_line(f"{rpc}: {', '.join(parts)}")


@dataclass
class Budget:
    """How much a fuzz test runs: ``settings(n)`` for hypothesis properties, ``cases(n)``
    and ``rng`` for the seeded byte-level loops, ``seconds`` as a wall-clock bound."""

    long: bool
    seed: int
    seconds: float

    def scaled(self, n: int) -> int:
        return max(1, int(n * SCALE)) if self.long else n

    def settings(self, examples: int) -> settings:
        common = dict(max_examples=self.scaled(examples), database=None, deadline=timedelta(seconds=60),
                      suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
        if self.long:
            return settings(derandomize=False, print_blob=True, **common)
        return settings(derandomize=True, phases=(Phase.explicit, Phase.generate), **common)

    def seeded(self, fn):
        """Pin a long run's hypothesis seed (the default run is derandomized)."""
        return seed(self.seed)(fn) if self.long else fn

    def rng(self, salt: str) -> random.Random:
        return random.Random(f"{self.seed}:{salt}")

    def cases(self, n: int) -> range:
        return range(self.scaled(n))

    def deadline(self) -> float:
        return time.monotonic() + self.seconds

    def out_of_time(self, deadline: float, done: int, planned: int) -> bool:
        if time.monotonic() < deadline:
            return False
        warnings.warn(f"fuzz budget of {self.seconds:.0f} s spent after {done} of {planned} cases")
        return True


@pytest.fixture(params=[pytest.param(False, id="default", marks=pytest.mark.timeout(180)),
                        pytest.param(True, id="long", marks=[pytest.mark.fuzz_long, pytest.mark.timeout(4 * 3600)])])
def budget(request) -> Budget:
    long = request.param
    if long:
        s = int(os.environ.get("BYZFED_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
        print(f"fuzz_long: BYZFED_FUZZ_SEED={s} BYZFED_FUZZ_SCALE={SCALE:g}")
        return Budget(True, s, seconds=3.5 * 3600)
    return Budget(False, DEFAULT_SEED, seconds=120)


@pytest.fixture(scope="module")
def fed(request, tmp_path_factory):
    """A live federation per test module (``FUZZ_NODES`` in the module: how many fuzz nodes)."""
    f = LiveFederation(tmp_path_factory.mktemp("fuzz"), fuzz_nodes=getattr(request.module, "FUZZ_NODES", 8))
    yield f
    f.close()
