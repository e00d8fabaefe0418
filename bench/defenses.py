"""Aggregation cost of every defense, as ratios to two references timed in the same run.

For each size (n clients x d parameters, float32, CPU, f = 30% of n) the
references are ``torch.mean(updates, 0)`` and one Gram product ``updates @
updates.T``; each rule's best-of-``reps`` time is printed with its ratio to
both and checked against its target:

* Krum, Multi-Krum, GeoMed and their Layerwise Cosine variants: <= 1.3x (Gram + mean);
* Bulyan: <= the same variant's Krum time + one trimmed-mean time;
* coordinate-wise median and trimmed mean: <= 15x mean; FedSECA: <= 30x mean;
* peak memory of every rule: <= two extra copies of the n x d matrix
  (growth of the live C-heap bytes, sampled every 0.5 ms during the first call).

Bulyan needs n >= 4f + 3, so it runs at f = floor((n - 3) / 4) (4, 11, 24).
Updates are laid out as real models: d = 1M is the workload CNN on 1x22x22
inputs (8 tensors), d = 11M is ResNet-18 on 3x32x32 (102 tensors, 40 of them
BatchNorm buffers); the plugin (vdc) runs those models (8 probes).

    ./launch.sh bench defenses [--n 20 50 100] [--d 1M 11M] [--reps 3] [--only krum,median]
                               [--threads 1 --clock cpu] [--wait-idle 60] [--heap orchestrator|default]
                               [--common 1000] [--peers /tmp/peers]

``--peers DIR`` also times other implementations in the same process and
rounds, as ratios to the same mean reference (table "Peers"): ByzFL's
``Median`` and ``TrMean`` on the numpy matrix (its numpy path: ``np.median`` /
``np.sort`` along the client axis), loaded from ``DIR`` (``pip install --no-deps
--target DIR byzfl==0.0.11``; only its aggregator module is imported, not the
package, whose ``__init__`` pulls in torchvision), plus ``scipy.stats.trim_mean``
and ``torch.median(dim=0)``. ByzFL is not a dependency of the project.

``--common S`` adds a part shared by every update, ``S`` times the spread (the
default data has none; late in training ``S`` is ~1000, where the Euclidean
Gram rules centre their float32 products, see ``_geometry.frame``).

The process runs with the orchestrator's glibc heap settings by default
(``--heap default`` for glibc's own): what a defense costs inside the
orchestrator is what is measured.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.defenses import REGISTRY, RoundContext, build_defense  # noqa: E402
from proto.layout import Layout  # noqa: E402

MODELS = {"1M": ("cnn", (1, 22, 22)), "11M": ("resnet18", (3, 32, 32))}
LCA = [("", {}), ("layerwise", {"layerwise": True}), ("cosine+clip", {"distance": "cosine", "clip": "median"}),
       ("layerwise cosine", {"layerwise": True, "distance": "cosine", "clip": "median"})]


def rules() -> list[tuple[str, str, dict]]:
    """``(label, registry name, params)``: every registered rule, every LCA variant."""
    out = [("mean", "mean", {}), ("fedavg", "fedavg", {}), ("median", "median", {}), ("trimmed_mean", "trimmed_mean", {})]
    for name in ("krum", "multikrum", "geomed", "bulyan"):
        for tag, params in LCA:
            out.append((f"{name} {tag}".strip(), name, params))
    out += [("bulyan one-shot/trimmed", "bulyan", {"selection": "one-shot", "reduction": "trimmed-mean"}),
            ("bulyan median-output", "bulyan", {"layerwise": True, "distance": "cosine", "clip": "median-output",
                                                "selection": "one-shot", "reduction": "trimmed-mean"}),
            ("rfa", "rfa", {}), ("centered_clipping", "centered_clipping", {}), ("norm_clipping", "norm_clipping", {}),
            ("nnm -> krum", "nnm", {"inner": "krum"}), ("bucketing -> median", "bucketing", {}),
            ("layerwise -> median", "layerwise", {}), ("fedseca", "fedseca", {}), ("stpa", "stpa", {}),
            ("vdc -> mean", "vdc", {"probes": 8, "clients_per_pass": 25})]
    assert {name for _, name, _ in out} == set(REGISTRY), "bench must cover every registered defense"
    return out


def variant(params: dict) -> tuple:
    """The Layerwise Cosine variant of a distance-based rule (output clipping costs nothing)."""
    return (bool(params.get("layerwise")), params.get("distance", "euclidean"),
            params.get("clip") if params.get("clip") == "median" else None)


def target(name: str, params: dict, krum: dict[tuple, float], t: dict[str, float],
           ref: dict[str, float]) -> tuple[float, str] | None:
    """``(limit_seconds, words)`` for the rules with a target."""
    if name in ("krum", "multikrum", "geomed"):
        return 1.3 * (ref["gram"] + ref["mean"]), "1.3x (gram+mean)"
    if name == "bulyan" and variant(params) in krum and "trimmed_mean" in t:
        return krum[variant(params)] + t["trimmed_mean"], "same-variant krum + trimmed_mean"
    if name in ("median", "trimmed_mean"):
        return 15 * ref["mean"], "15x mean"
    if name == "fedseca":
        return 30 * ref["mean"], "30x mean"
    return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class PeakHeap:
    """Peak growth of the bytes the C heap has handed out (glibc ``mallinfo2``,
    all arenas plus mmapped blocks), sampled every half millisecond in a
    thread. This counts live allocations (tensors), not memory the allocator
    keeps cached after a free, which makes the resident set noisier."""

    def __init__(self) -> None:
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallinfo2.restype = _MallInfo2

    def in_use(self) -> int:
        info = self.libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def __enter__(self) -> "PeakHeap":
        self.base = self.peak = self.in_use()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.in_use())
            time.sleep(0.0005)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.in_use())

    @property
    def extra(self) -> int:
        return self.peak - self.base


CLOCK = time.perf_counter
IDLE_WAIT = 0.0
COMMON = 0.0
PEERS: "object | None" = None
PEERS_VERSION = ""


def load_byzfl(target: str):
    """ByzFL's aggregator module from a ``pip install --target`` folder, without
    running the package's ``__init__`` (which imports its training framework
    and torchvision): empty package stubs for ``byzfl`` and its subpackages."""
    import importlib.util
    import types

    root = Path(target) / "byzfl"
    if not (root / "aggregators" / "aggregators.py").is_file():
        raise SystemExit(f"--peers {target}: no byzfl/aggregators/aggregators.py there "
                         f"(pip install --no-deps --target {target} byzfl==0.0.11)")
    for name, sub in (("byzfl", root), ("byzfl.utils", root / "utils"), ("byzfl.aggregators", root / "aggregators")):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(sub)]
            sys.modules[name] = mod
    spec = importlib.util.spec_from_file_location("byzfl.aggregators.aggregators", root / "aggregators" / "aggregators.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    versions = sorted(Path(target).glob("byzfl-*.dist-info"))
    global PEERS_VERSION
    PEERS_VERSION = versions[-1].name[len("byzfl-"):-len(".dist-info")] if versions else "?"
    return mod


def peer_calls(updates: torch.Tensor, f: int) -> list[tuple[str, str, object]]:
    """``(label, byzfed rule it compares with, call)`` for the peers' aggregators."""
    import numpy as np
    import scipy.stats

    xn = updates.numpy()
    median, trmean = PEERS.Median(), PEERS.TrMean(f)
    n = updates.shape[0]
    return [(f"ByzFL {PEERS_VERSION} Median (np.median, axis 0)", "median", lambda: median(xn)),
            (f"ByzFL {PEERS_VERSION} TrMean(f) (np.sort, axis 0)", "trimmed_mean", lambda: trmean(xn)),
            ("scipy.stats.trim_mean(f / n, axis 0)", "trimmed_mean",
             lambda: scipy.stats.trim_mean(xn, f / n, axis=0)),
            ("torch.median(dim=0)", "median", lambda: torch.median(updates, 0)),
            ("np.median(axis=0)", "median", lambda: np.median(xn, axis=0))]


def _cpu_idle(window: float = 0.25) -> float:
    """Fraction of all cores idle over ``window`` seconds (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        return vals[3] + vals[4], sum(vals)
    idle0, total0 = sample()
    time.sleep(window)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(total1 - total0, 1)


def wait_idle() -> None:
    """On a shared machine, wait (at most ``--wait-idle`` seconds) for the other
    tenants to leave the cores mostly idle before a timed call."""
    end = time.monotonic() + IDLE_WAIT
    while IDLE_WAIT > 0 and time.monotonic() < end and _cpu_idle() < 0.8:
        pass


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return min(times)


def run_size(n: int, dkey: str, reps: int, only: set[str] | None) -> None:
    from fednode.workload.models import build_model

    mname, shape = MODELS[dkey]
    torch.manual_seed(0)
    model = build_model(mname, shape, 10)
    layout = Layout.from_module(model)
    d = layout.d
    gw = layout.flatten(model.state_dict())
    updates = torch.randn(n, d, generator=torch.Generator().manual_seed(n)).mul_(1e-3)
    if COMMON:
        # A part every client shares, COMMON times the per-client spread (late in
        # training the spread is ~1e-3 of it: float32 Gram products cancel).
        shared = torch.randn(d, generator=torch.Generator().manual_seed(1000 + n)).mul_(1e-3 * COMMON)
        updates.add_(shared)
    f, fb = int(0.3 * n), (n - 3) // 4

    def ctx(ff: int) -> RoundContext:
        return RoundContext(layout=layout, global_weights=gw, round=1, f=ff, generator=torch.Generator().manual_seed(1),
                            state={}, model_fn=lambda: build_model(mname, shape, 10), sample_counts=torch.ones(n))

    todo = [(label, name, params, build_defense(name, params)) for label, name, params in rules()
            if not only or name in only or label in only]
    refs: dict[str, list[float]] = {"mean": [], "gram": []}
    times: dict[str, list[float]] = {label: [] for label, *_ in todo}
    peers = peer_calls(updates, f) if PEERS is not None else []
    peer_times: dict[str, list[float]] = {label: [] for label, *_ in peers}
    extra: dict[str, int] = {}
    # Rounds of one call per rule, references re-timed every round: on a shared
    # machine the best of each is the least disturbed.
    for rep in range(reps):
        wait_idle()
        refs["mean"].append(best_of(lambda: torch.mean(updates, 0), 3))
        refs["gram"].append(best_of(lambda: updates @ updates.T, 2))
        for label, name, params, rule in todo:
            c = ctx(fb if name == "bulyan" else f)
            gc.collect()
            wait_idle()
            if rep == 0:
                with PeakHeap() as mem:
                    t = CLOCK()
                    rule(updates, c)
                    t = CLOCK() - t
                extra[label] = mem.extra
            else:
                t = CLOCK()
                rule(updates, c)
                t = CLOCK() - t
            times[label].append(t)
        for label, _, call in peers:
            gc.collect()
            wait_idle()
            t = CLOCK()
            call()
            peer_times[label].append(CLOCK() - t)
    wait_idle()
    refs["mean"].append(best_of(lambda: torch.mean(updates, 0), 3))
    refs["gram"].append(best_of(lambda: updates @ updates.T, 2))
    ref = {k: min(v) for k, v in refs.items()}
    copy_bytes = n * d * 4
    print(f"\n### n = {n}, d = {d:,} ({dkey}: {mname}, {len(layout)} tensors), f = {f} (Bulyan: f = {fb})\n")
    print(f"References (best of {len(refs['mean'])} rounds): mean {ref['mean'] * 1e3:.1f} ms, Gram "
          f"{ref['gram'] * 1e3:.1f} ms; worst rounds: mean {max(refs['mean']) * 1e3:.1f} ms, Gram "
          f"{max(refs['gram']) * 1e3:.1f} ms. One n x d copy = {copy_bytes / 2**20:.0f} MiB.\n")
    print("| rule | ms | x mean | x Gram | x (Gram+mean) | peak extra heap (n x d copies) | target | met |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    best: dict[str, float] = {}
    krum: dict[tuple, float] = {}
    for label, name, params, _ in todo:
        t = best[label] = min(times[label])
        if name == "krum":
            krum[variant(params)] = t
        tgt = target(name, params, krum, best, ref)
        met = "" if tgt is None else ("yes" if t <= tgt[0] else f"**no** ({t / tgt[0]:.2f}x the limit)")
        over = "" if extra[label] <= 2 * copy_bytes else " **over**"
        print(f"| {label} | {t * 1e3:.1f} | {t / ref['mean']:.1f} | {t / ref['gram']:.2f} | "
              f"{t / (ref['gram'] + ref['mean']):.2f} | {extra[label] / copy_bytes:.2f}{over} | "
              f"{'' if tgt is None else tgt[1]} | {met} |", flush=True)
    if peers:
        print(f"\nPeers (same process and rounds, f = {f}, best of {reps}): x mean, and byzfed's time "
              f"over the peer's (< 1: byzfed faster)\n")
        print("| peer | ms | x mean | byzfed rule | byzfed x mean | byzfed / peer |")
        print("|---|---:|---:|---|---:|---:|")
        for label, ours, _ in peers:
            t = min(peer_times[label])
            mine = best.get(ours)
            print(f"| {label} | {t * 1e3:.1f} | {t / ref['mean']:.1f} | {ours} | "
                  + ("" if mine is None else f"{mine / ref['mean']:.1f}") + " | "
                  + ("" if mine is None else f"{mine / t:.2f}") + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[20, 50, 100])
    p.add_argument("--d", nargs="+", default=["1M", "11M"], choices=sorted(MODELS))
    p.add_argument("--reps", type=int, default=3, help="best of this many calls (the first call counts)")
    p.add_argument("--only", default="", help="comma-separated rule names or labels")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, i.e. one per core)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or process CPU time (with --threads 1: stable on a shared machine)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each timed call wait up to S seconds for the cores to be >= 80%% idle")
    p.add_argument("--common", type=float, default=0.0, metavar="S",
                   help="add a part shared by every update, S times the per-client spread "
                        "(1000: late in training, where the Gram rules centre their float32 products)")
    p.add_argument("--heap", choices=("orchestrator", "default"), default="orchestrator",
                   help="glibc malloc settings: the orchestrator's (steady_heap: buffers >= 1 MiB are "
                        "their own mappings, so fresh temporaries page-fault) or glibc's defaults")
    p.add_argument("--peers", default=None, metavar="DIR",
                   help="also time ByzFL's Median/TrMean (installed with pip --target DIR), scipy's "
                        "trim_mean and torch.median, as ratios to the same mean")
    args = p.parse_args(argv)
    global PEERS
    if args.peers:
        PEERS = load_byzfl(args.peers)
    if args.heap == "orchestrator":
        from orchestrator.coordinator import steady_heap

        steady_heap()
    global CLOCK, IDLE_WAIT, COMMON
    IDLE_WAIT = args.wait_idle
    COMMON = args.common
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {args.clock} clock, "
          f"{args.heap} heap settings" + (f", common part {args.common:g}x the spread" if args.common else ""))
    for dkey in args.d:
        for n in args.n:
            run_size(n, dkey, args.reps, only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
