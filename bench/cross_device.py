"""Cross-device benchmark: run a scenario with one process per node and measure memory and time.

    ./launch.sh bench cross_device                         # scenarios/cross-device.toml, 100 processes
    ./launch.sh bench cross_device --scenario S.toml --set federation.rounds=5

Starts ``./launch.sh run SCENARIO --run-dir DIR`` (the orchestrator is that process; the
nodes are its children) and samples ``/proc`` every ``--interval`` seconds:

* each node's RSS and PSS (``/proc/PID/smaps``; PSS splits shared pages, such as
  torch's code, between the processes that map them). Nodes forked from the node fork
  server (``fednode/forkserver.py``, the default) are the server's children and all
  map torch (shared), so a node counts as *idle* when it used under 2% of a core since
  the previous sample; a fresh ``python -m fednode`` node (``BYZFED_FORK_SERVER=0``)
  counts as idle while it has not loaded torch (``libtorch_cpu`` in its maps), as
  before. The fork server's own PSS is counted in the nodes' total;
* each selected node's start-up CPU (torch, model, shard: from its selection to the
  start of training), from the ``start-up ... s CPU`` lines of the node logs;
* the orchestrator's RSS when each ``metrics.jsonl`` row appears (flat over rounds?);
* seconds per round from the rows' ``wall`` stamps.

Writes ``DIR/bench.json`` and prints a Markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sample(pid: int) -> tuple[int, int, bool] | None:
    """(RSS KiB, PSS KiB, torch loaded) from one read of ``/proc/PID/smaps``, so that the
    figures and the torch flag describe the same process image (a light node re-executes
    itself between rounds). None when the process is gone."""
    rss = pss = 0
    torch_loaded = False
    try:
        with open(f"/proc/{pid}/smaps") as fh:
            text = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for line in text.splitlines():
        if line.startswith("Rss:"):
            rss += int(line.split()[1])
        elif line.startswith("Pss:"):
            pss += int(line.split()[1])
        elif not torch_loaded and "libtorch_cpu" in line:
            torch_loaded = True
    return rss, pss, torch_loaded


def mem_kb(pid: int) -> tuple[int, int] | None:
    s = sample(pid)
    return None if s is None else (s[0], s[1])


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_ns(pid: int) -> int | None:
    """Nanoseconds on a CPU, all threads (``/proc/PID/task/*/schedstat``: finer than the
    10 ms ticks of ``stat``, which an idle node's second rounds to 0 or 10 ms)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return None
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue
    return total


def is_fork_server(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"fednode.forkserver" in fh.read() and comm(pid).startswith("python")
    except OSError:
        return False


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def node_pids(orchestrator: int) -> tuple[list[int], list[int]]:
    """(node processes, fork servers) under the orchestrator."""
    nodes, servers = [], []
    for pid in children(orchestrator):
        if is_fork_server(pid):
            servers.append(pid)
            nodes.extend(children(pid))
        else:
            nodes.append(pid)
    return nodes, servers


def startup_cpu(run_dir: Path) -> list[float]:
    import re
    out = []
    for log in (run_dir / "nodes").glob("*.log"):
        out += [float(v) for v in re.findall(r"start-up ([0-9.]+) s CPU", log.read_text(errors="replace"))]
    return out


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                stat = fh.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(d))
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def launch_command(scenario: str, overrides: list[str], out: str) -> tuple[Path, list[str], Path]:
    """``(run folder, ./launch.sh run command, its log file)`` for one benchmark run under ``out``."""
    run_dir = Path(out) / time.strftime("%Y%m%d-%H%M%S")
    cmd = [str(ROOT / "launch.sh"), "run", scenario, "--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    print("running:", " ".join(cmd), flush=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    return run_dir, cmd, Path(out) / f"{run_dir.name}.log"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default=str(ROOT / "scenarios" / "cross-device.toml"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-cross-device"))
    p.add_argument("--interval", type=float, default=2.0)
    args = p.parse_args(argv)

    run_dir, cmd, log_path = launch_command(args.scenario, args.overrides, args.out)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    idle_rss, idle_pss, torch_rss, torch_pss = [], [], [], []
    idle_pss_totals: list[int] = []
    prev_cpu: dict[int, float] = {}
    prev_ns: dict[int, tuple[float, int]] = {}
    idle_cpu: list[float] = []  # an idle node's CPU between two samples, microseconds per second
    idle_cores: list[float] = []  # all idle nodes' CPU between two samples, in cores
    orch_cores: list[float] = []
    prev_orch: tuple[float, int] | None = None
    forked = False
    max_nodes, max_node_pss_total, max_torch_procs = 0, 0, 0
    orch_per_round: list[dict] = []
    seen_rows = 0
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            kids, servers = node_pids(proc.pid)
            forked = forked or bool(servers)
            total = sum((mem_kb(s) or (0, 0))[1] for s in servers)
            n_torch = 0
            idle_total = 0
            idle_sum, idle_seen = 0.0, 0
            now = time.monotonic()
            on = cpu_ns(proc.pid)
            if on is not None:
                if prev_orch is not None and now > prev_orch[0]:
                    orch_cores.append((on - prev_orch[1]) / 1e9 / (now - prev_orch[0]))
                prev_orch = (now, on)
            for pid in kids:
                m = sample(pid)
                cpu = cpu_seconds(pid)
                if m is None or cpu is None:
                    continue
                total += m[1]
                busy = m[2]
                if servers:  # forked: every node maps torch; idle = (almost) no CPU since the last sample
                    before = prev_cpu.get(pid)
                    busy = before is None or cpu - before > 0.02 * args.interval
                prev_cpu[pid] = cpu
                ns, last = cpu_ns(pid), prev_ns.get(pid)
                if ns is not None:
                    prev_ns[pid] = (now, ns)
                if not busy:
                    idle_total += m[1]
                    if ns is not None and last is not None and now > last[0]:
                        rate = (ns - last[1]) / 1e3 / (now - last[0])
                        idle_cpu.append(rate)
                        idle_sum += rate
                        idle_seen += 1
                if busy:
                    n_torch += 1
                    torch_rss.append(m[0])
                    torch_pss.append(m[1])
                else:
                    idle_rss.append(m[0])
                    idle_pss.append(m[1])
            idle_pss_totals.append(idle_total)
            if idle_seen:
                idle_cores.append(idle_sum / 1e6)
            max_nodes = max(max_nodes, len(kids))
            max_node_pss_total = max(max_node_pss_total, total)
            max_torch_procs = max(max_torch_procs, n_torch)
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists():
                rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
                om = mem_kb(proc.pid)
                for row in rows[seen_rows:]:
                    orch_per_round.append({"round": row["round"], "wall": row.get("wall"),
                                           "orchestrator_rss_mb": round(om[0] / 1024, 1) if om else None,
                                           "outcome": row.get("outcome"), "accuracy": row.get("accuracy"),
                                           "reported": row.get("reported"), "selected": row.get("selected"),
                                           "dropped": row.get("dropped"), "nodes_with_torch": n_torch})
                seen_rows = len(rows)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        os.kill(proc.pid, signal.SIGINT)
        proc.wait()
        raise
    wall = time.monotonic() - t0
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    walls = [r["wall"] for r in orch_per_round if r["wall"] is not None]
    per_round = [b - a for a, b in zip(walls, walls[1:])]
    orch = [r["orchestrator_rss_mb"] for r in orch_per_round if r["orchestrator_rss_mb"]]
    mb = lambda kb: round(kb / 1024, 1)  # noqa: E731
    result = {
        "command": " ".join(cmd), "exit_code": proc.returncode, "wall_seconds": round(wall, 1),
        "node_processes_max": max_nodes, "nodes_with_torch_max": max_torch_procs,
        "idle_node_rss_mb": {"median": mb(pct(idle_rss, 0.5)), "p95": mb(pct(idle_rss, 0.95)),
                             "p99": mb(pct(idle_rss, 0.99)), "max": mb(max(idle_rss, default=0))},
        "idle_node_pss_mb": {"median": mb(pct(idle_pss, 0.5)), "p95": mb(pct(idle_pss, 0.95)),
                             "p99": mb(pct(idle_pss, 0.99)), "max": mb(max(idle_pss, default=0))},
        "samples": {"idle": len(idle_rss), "torch": len(torch_rss),
                    "idle_over_160mb": sum(1 for v in idle_rss if v > 160 * 1024)},
        "torch_node_rss_mb": {"median": mb(pct(torch_rss, 0.5)), "p95": mb(pct(torch_rss, 0.95)), "max": mb(max(torch_rss, default=0))},
        "torch_node_pss_mb": {"median": mb(pct(torch_pss, 0.5)), "p95": mb(pct(torch_pss, 0.95)), "max": mb(max(torch_pss, default=0))},
        "all_nodes_pss_total_max_mb": mb(max_node_pss_total),
        "idle_nodes_pss_total_max_mb": mb(max(idle_pss_totals, default=0)),
        "idle_node_cpu_us_per_s": {"median": round(pct(idle_cpu, 0.5), 1), "p95": round(pct(idle_cpu, 0.95), 1),
                                   "samples": len(idle_cpu)},
        "idle_nodes_cores": {"median": round(pct(idle_cores, 0.5), 3), "max": round(max(idle_cores, default=0), 3)},
        "orchestrator_cores": {"median": round(pct(orch_cores, 0.5), 3), "max": round(max(orch_cores, default=0), 3)},
        "forked_nodes": forked,
        "startup_cpu_s": (lambda v: {"selections": len(v), "median": round(pct(v, 0.5), 3), "p95": round(pct(v, 0.95), 3),
                                     "max": round(max(v, default=float("nan")), 3)})(startup_cpu(run_dir)),
        "orchestrator_rss_mb": {"first_round": orch[0] if orch else None, "last_round": orch[-1] if orch else None,
                                "max": max(orch) if orch else None},
        "seconds_per_round": {"mean": round(statistics.mean(per_round), 2) if per_round else None,
                              "median": round(statistics.median(per_round), 2) if per_round else None,
                              "max": round(max(per_round), 2) if per_round else None},
        "first_round_at_s": walls[0] if walls else None,
        "rounds": orch_per_round, "summary": summary,
    }
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    print("\n| round | wall s | orchestrator RSS MB | nodes with torch | reported/selected | dropped | accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in orch_per_round:
        dropped = " ".join(f"{k}:{v}" for k, v in (r["dropped"] or {}).items() if v) or "-"
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else r["outcome"]
        print(f"| {r['round']} | {r['wall']} | {r['orchestrator_rss_mb']} | {r['nodes_with_torch']} | "
              f"{r['reported']}/{r['selected']} | {dropped} | {acc} |")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
