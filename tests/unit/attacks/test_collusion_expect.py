"""The collusion board waits for a round's selected colluders, not only those that
announced: a colluder that trains fast does not fetch a partial group."""
from __future__ import annotations

import threading
import time

import numpy as np

from attacks.collusion import CollusionService


def test_fetch_waits_for_the_expected_members():
    s = CollusionService(["a", "b", "c"], "t" * 16)
    s.expect(0, ["a", "b", "honest-1"])  # c was not selected; honest-1 is not a member
    s.announce("a", 0)
    s.post("a", 0, np.ones(3, dtype=np.float32))
    late = threading.Timer(0.3, lambda: s.post("b", 0, 2 * np.ones(3, dtype=np.float32)))
    late.start()
    t0 = time.monotonic()
    members, rows = s.fetch("a", 0, timeout=5.0)  # b had not even announced
    late.join()
    assert members == ["a", "b"] and rows.shape == (2, 3)
    assert 0.25 < time.monotonic() - t0 < 4.0
    # without expectations (async mode), the announced members are what it waits for
    s.post("a", 1, np.ones(3, dtype=np.float32))
    assert s.fetch("a", 1, timeout=5.0)[0] == ["a"]
