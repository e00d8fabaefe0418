"""The soak: a long run under churn, the orchestrator's RSS and open file descriptors
sampled as it goes.

Runs ``python -m orchestrator run SCENARIO --run-dir OUT/run`` (default
``scenarios/soak.toml``: 1,000 rounds, 7 nodes with drop-outs, crashes with
restarts, a late join and a leave-and-return) and every ``--every`` seconds reads the
orchestrator's ``VmRSS`` and the number of entries in ``/proc/PID/fd``, with the
rounds recorded so far. Writes ``OUT/soak.csv`` (seconds, round, rss_mb, fds) and
``OUT/soak.png`` (RSS and fds against rounds), and prints the drift: the median of
the last tenth of the samples against the median of the tenth after warm-up.

    ./launch.sh bench soak                          # the 1,000 rounds
    ./launch.sh bench soak --rounds 100 --out /tmp/soak100
"""
from __future__ import annotations

import argparse
import csv
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rounds_done(metrics: Path) -> int:
    try:
        with metrics.open("rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def drift(values: list[float]) -> tuple[float, float]:
    """Median of the tenth of the samples after the first tenth (warm-up), and of the last tenth."""
    k = max(1, len(values) // 10)
    return statistics.median(values[k:2 * k] or values), statistics.median(values[-k:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default=str(ROOT / "scenarios" / "soak.toml"))
    ap.add_argument("--rounds", type=int, default=None, help="override federation.rounds")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "soak"))
    ap.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    ap.add_argument("--limit", type=float, default=3 * 3600, help="stop the run after this many seconds")
    args = ap.parse_args(argv)
    out = Path(args.out)
    run_dir = out / "run"
    out.mkdir(parents=True, exist_ok=True)
    if run_dir.exists() and any(run_dir.iterdir()):
        print(f"{run_dir} is not empty: pass another --out", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "orchestrator", "run", args.scenario, "--run-dir", str(run_dir)]
    if args.rounds:
        cmd += ["--set", f"federation.rounds={args.rounds}"]
    log = (out / "orchestrator.log").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    samples: list[tuple[float, int, float, int]] = []
    t0 = time.monotonic()
    metrics = run_dir / "metrics.jsonl"
    try:
        while proc.poll() is None and time.monotonic() - t0 < args.limit:
            try:
                samples.append((round(time.monotonic() - t0, 1), rounds_done(metrics), rss_mb(proc.pid), fds(proc.pid)))
            except OSError:  # (it ended between the poll and the read)
                break
            if len(samples) % 30 == 0:
                s = samples[-1]
                print(f"{s[0]:7.0f} s  round {s[1]:5d}  rss {s[2]:7.1f} MB  fds {s[3]}", flush=True)
            time.sleep(args.every)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
    with (out / "soak.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seconds", "round", "rss_mb", "fds"])
        w.writerows(samples)
    if len(samples) < 20:
        print(f"too few samples ({len(samples)}); the run's log: {out / 'orchestrator.log'}", file=sys.stderr)
        return 1
    r0, r1 = drift([s[2] for s in samples])
    f0, f1 = drift([s[3] for s in samples])
    print(f"exit {proc.returncode}; {samples[-1][1]} rounds in {samples[-1][0]:.0f} s; "
          f"RSS {r0:.1f} -> {r1:.1f} MB ({r1 / r0:.3f}x); fds {f0:.0f} -> {f1:.0f}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.plot([s[1] for s in samples], [s[2] for s in samples], color="tab:blue")
    ax.set_xlabel("rounds recorded")
    ax.set_ylabel("orchestrator RSS (MB)", color="tab:blue")
    ax.set_ylim(0, max(s[2] for s in samples) * 1.15)
    ax2 = ax.twinx()
    ax2.plot([s[1] for s in samples], [s[3] for s in samples], color="tab:orange")
    ax2.set_ylabel("open file descriptors", color="tab:orange")
    ax2.set_ylim(0, max(s[3] for s in samples) * 1.3)
    ax.set_title(f"soak: {Path(args.scenario).name}, {samples[-1][1]} rounds with churn")
    fig.tight_layout()
    fig.savefig(out / "soak.png")
    print(f"wrote {out / 'soak.csv'} and {out / 'soak.png'}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
