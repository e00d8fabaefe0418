"""Cost of exact float32 distances: the centred Gram frame against the uncentred one.

The Euclidean Gram rules (Krum, Multi-Krum, Bulyan, GeoMed, RFA, centered
clipping, NNM) read their distances off ``orchestrator.defenses._geometry.frame``.
When the updates share a part large against their spread (late in training),
``frame(x, centre=True)`` takes the Gram matrix of the rows minus a central row,
block by block, so that float32 products keep the distances exact; without a
common part it is one float32 product. This script times, interleaved round by
round in one process, on the same ``[n, d]`` float32 rows:

* ``x @ x.T`` (one library product, the floor);
* ``frame(x, centre=False)`` (the uncentred frame: what the rules paid before
  distances were exact);
* ``frame(x, centre=True)`` (what they pay now), with and without the origin
  point (RFA, centered clipping and the median-clipped rules ask for it),

and prints best and median milliseconds and the centred / uncentred ratios,
for each torch thread count asked. The data is ``common * N(0, 1)`` (one row
shared by all) plus ``N(0, 1)`` per row, the benchmark data of
``bench/defenses.py --common``; the check that the centred picks are exact is
in ``tests/test_defenses_extreme.py``, not here.

    ./launch.sh bench frame [--n 20 50 100] [--d 1011466] [--common 1000]
                            [--threads 1 2] [--rounds 15] [--clock cpu|wall]

``--clock cpu`` (process CPU time) is the stable measurement on a shared VM at
one thread; at two threads only wall time says whether the threads overlap.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.defenses import _geometry  # noqa: E402


def rows(n: int, d: int, common: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if common:
        x.add_(torch.randn(1, d, generator=g).mul_(common))
    return x.mul_(1e-3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[20, 50, 100])
    p.add_argument("--d", type=int, default=1_011_466, help="columns (default: the 1M workload CNN)")
    p.add_argument("--common", type=float, default=1000.0, help="common part, times the spread")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--clock", choices=("cpu", "wall"), default=None,
                   help="default: cpu at one thread, wall above")
    p.add_argument("--heap", choices=("orchestrator", "default"), default="orchestrator")
    args = p.parse_args()
    if args.heap == "orchestrator":
        from orchestrator.coordinator import steady_heap

        steady_heap()
    print(f"d = {args.d:,}, common part {args.common:g}x the spread, {args.rounds} rounds interleaved, "
          f"torch {torch.__version__}, {args.heap} heap")
    print()
    print("| threads | clock | n | `x @ x.T` ms | uncentred ms | centred ms | centred + origin ms "
          "| centred / uncentred | centred + origin / uncentred |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        clock_name = args.clock or ("cpu" if threads == 1 else "wall")
        clock = time.process_time if clock_name == "cpu" else time.perf_counter
        for n in args.n:
            x = rows(n, args.d, args.common)
            cases = {
                "gram": lambda: x @ x.T,
                "plain": lambda: _geometry.frame(x, centre=False),
                "centred": lambda: _geometry.frame(x, centre=True),
                "origin": lambda: _geometry.frame(x, centre=True, origin=True),
            }
            if args.common and not _geometry.frame(x, centre=True).centred:
                raise SystemExit(f"n = {n}: the frame did not centre (common part too small to need it)")
            times: dict[str, list[float]] = {k: [] for k in cases}
            for fn in cases.values():
                fn()  # warm: scratch, thread pool, page faults
            order = list(cases)
            for r in range(args.rounds):
                for k in (order if r % 2 == 0 else order[::-1]):
                    t0 = clock()
                    cases[k]()
                    times[k].append(clock() - t0)
            best = {k: min(v) * 1e3 for k, v in times.items()}
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"| {threads} | {clock_name} | {n} | {best['gram']:.1f} | {best['plain']:.1f} "
                  f"({med['plain']:.1f}) | {best['centred']:.1f} ({med['centred']:.1f}) | "
                  f"{best['origin']:.1f} ({med['origin']:.1f}) | {best['centred'] / best['plain']:.2f} "
                  f"({med['centred'] / med['plain']:.2f}) | {best['origin'] / best['plain']:.2f} "
                  f"({med['origin'] / med['plain']:.2f}) |", flush=True)
    print()
    print("Each cell: best (median in brackets).")


if __name__ == "__main__":
    main()
