"""Which CPU kernel sorts the columns of an ``[n, d]`` block faster: the pruned
Batcher network or numpy's sort of the transposed block (``_order.kernel``).

For each ``n`` (d columns, float32, one torch thread, process CPU time by
default) prints the best-of-``reps`` time of both kernels, as ratios to
``torch.mean(x, 0)`` timed in the same round, for the three kinds of calls
the rules make: the median's two middle positions ("pair"), the trimmed mean at
k = 30% of n ("pair") and every position (Bulyan's reductions, "all"). The
table ``_order.SORT_FROM`` (first n where sort wins) was set from this output.

    .venv/bin/python bench/order_kernels.py [--n 8 12 16 20 24 32 50 100] [--d 1048576] [--reps 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.defenses._order import kernel, map_sorted_columns  # noqa: E402
from orchestrator.defenses.trimmed_mean import trimmed_mean  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[8, 12, 16, 20, 24, 32, 50, 100])
    p.add_argument("--d", type=int, default=1 << 20)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    args = p.parse_args(argv)
    from orchestrator.coordinator import steady_heap

    steady_heap()
    torch.set_num_threads(1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print("| n | kind | network (x mean) | sort (x mean) | faster | table picks |")
    print("|---:|---|---:|---:|---|---|")
    for n in args.n:
        x = torch.randn(n, args.d, generator=torch.Generator().manual_seed(n)).mul_(1e-3)
        out = torch.empty(args.d)
        lo, hi, k = (n - 1) // 2, n // 2, max(1, int(0.3 * n))

        def median(use: str) -> None:
            def fn(r, cols, ws):
                torch.mul(r[lo], 0.5, out=out[cols]).add_(r[hi], alpha=0.5)
            map_sorted_columns(x, fn, need=(lo, hi), use=use)

        def every(use: str) -> None:
            def fn(r, cols, ws):
                torch.add(r[0], r[n - 1], out=out[cols])
            map_sorted_columns(x, fn, use=use)

        cases = [("median", (lo, hi), median), ("trimmed mean", (k, n - 1 - k), lambda use: trimmed_mean(x, k, use)),
                 ("all positions", None, every)]
        best = {(c, u): float("inf") for c, *_ in cases for u in ("network", "sort")}
        mean = float("inf")
        for _ in range(args.reps):  # interleaved rounds: the best of each is the least disturbed
            t0 = clock()
            torch.mean(x, 0)
            mean = min(mean, clock() - t0)
            for label, _, call in cases:
                for use in ("network", "sort"):
                    t0 = clock()
                    call(use)
                    best[(label, use)] = min(best[(label, use)], clock() - t0)
        for label, need, _ in cases:
            a, b = best[(label, "network")] / mean, best[(label, "sort")] / mean
            print(f"| {n} | {label} | {a:.1f} | {b:.1f} | {'network' if a < b else 'sort'} | {kernel(n, need)} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
