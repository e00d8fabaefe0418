"""The live view at a thousand nodes: a burst of evictions prints a few lines and one
line of counts, not one line per node."""
from __future__ import annotations

import io

from rich.console import Console

from orchestrator.progress import LiveProgress


def test_a_burst_of_evictions_is_summed_up():
    out = io.StringIO()
    live = LiveProgress(Console(file=out, width=200), 3, enabled=False)
    for i in range(40):
        live.event("evicted", {"node": f"honest-{i:03d}"})
    live.event("message", {"text": "next"})
    lines = out.getvalue().splitlines()
    assert sum("lease expired (evicted)" in line and line.startswith("node ") for line in lines) == LiveProgress.BURST
    summary = [line for line in lines if "more nodes' leases expired" in line]
    assert summary == [f"{40 - LiveProgress.BURST} more nodes' leases expired (evicted): honest-005, honest-006, "
                       f"honest-007 +{40 - LiveProgress.BURST - 3}"]
    assert lines[-1] == "next"
