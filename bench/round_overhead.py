"""Round overhead: what a round costs beyond the work of its slowest node.

    ./launch.sh bench round_overhead [--scenario scenarios/overhead-50.toml] [--set key=value ...]
                                     [--out DIR]

Runs the scenario (default: 50 honest node processes, the 1.6M-parameter CNN, every node
selected every round) with ``./launch.sh run`` and reads two things afterwards:

* the orchestrator's ``metrics.jsonl``: each row's ``wall`` stamp (seconds since the run
  started, written when the round is closed, aggregated, applied and evaluated); a round's
  wall time is the difference between its stamp and the previous round's, so it counts
  everything between two rounds: selection, sending the tasks, waiting for uploads,
  aggregation, applying, evaluation, checkpointing, metrics;
* each node log's ``round R update sent (task to ack X s, download Y s)`` lines: X is the
  node's own part of round R, from the task's header reaching it to its upload's
  acknowledgement (download, waiting for a training slot, training, upload).

  Where the line also gives ``train Z s CPU`` (honest nodes), Z is the CPU its local
  training took.

Per round (from round 1: round 0 also waits for the joins), the overhead is the round's
wall time minus the largest X among its nodes, as a share of the round's wall time. The
nodes' X include waiting for one of the machine's training slots (2 cores, 50 nodes), so
the slowest node's X is the round's compute on this machine; what is left is the
orchestrator's part and the gaps between the two sides. Also per round: the nodes'
training CPU summed, against the scale issue's bound on a round's wall time, 1.5 x
(training CPU / cores) + 2 s (``--scenario scenarios/cross-device.toml`` for its 100-node
setting). Prints a Markdown table for
BENCHMARKS.md and writes ``DIR/round_overhead.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPAN = re.compile(r"round (\d+) update sent \(task to ack ([0-9.]+) s, download ([0-9.]+) s(?:, train ([0-9.]+) s CPU)?\)")


def spans(run_dir: Path) -> dict[int, list[tuple[str, float, float, float]]]:
    """round -> [(node, task-to-ack seconds, download seconds, training CPU seconds)] from
    the node logs (training CPU 0 where a line does not give it)."""
    out: dict[int, list[tuple[str, float, float, float]]] = {}
    for log in sorted((run_dir / "nodes").glob("*.log")):
        for r, span, down, cpu in SPAN.findall(log.read_text(errors="replace")):
            out.setdefault(int(r), []).append((log.stem, float(span), float(down), float(cpu or 0.0)))
    return out


def overhead(run_dir: Path, cores: int = 0) -> list[dict]:
    """Per complete round from round 1: wall time, slowest node, overhead (wall minus the
    slowest node's span) and its share; the nodes' training CPU and the scale issue's
    bound on the wall time, 1.5 x (training CPU / cores) + 2 s."""
    cores = cores or os.cpu_count() or 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_round = spans(run_dir)
    table = []
    for prev, row in zip(rows, rows[1:]):
        r = row["round"]
        if row.get("outcome") not in ("complete", "target") or r not in by_round:  # target: over-selection
            continue
        wall = row["wall"] - prev["wall"]
        node, span, down, _ = max(by_round[r], key=lambda t: t[1])
        cpu = sum(t[3] for t in by_round[r])
        table.append({"round": r, "wall": wall, "slowest_node": node, "slowest_span": span,
                      "train_cpu": cpu, "bound": 1.5 * cpu / cores + 2.0,
                      "slowest_download": down, "overhead": wall - span, "share": (wall - span) / wall,
                      "reported": row.get("reported"), "spans": len(by_round[r]),
                      "t_collect": row.get("t_collect"), "t_aggregate": row.get("t_aggregate"),
                      "t_evaluate": row.get("t_evaluate")})
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default=str(ROOT / "scenarios" / "overhead-50.toml"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-round-overhead"))
    p.add_argument("--run-dir", default=None, help="read an existing run folder instead of running one")
    args = p.parse_args(argv)

    if args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        sys.path.insert(0, str(ROOT / "bench"))
        from cross_device import launch_command

        run_dir, cmd, log_path = launch_command(args.scenario, args.overrides, args.out)
        with open(log_path, "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        if rc != 0:
            print(f"the run exited with status {rc}; see {log.name}", file=sys.stderr)
            return 1
    table = overhead(run_dir)
    if not table:
        print(f"no complete round with node spans in {run_dir}", file=sys.stderr)
        return 1
    (run_dir / "round_overhead.json").write_text(json.dumps(table, indent=1))
    print()
    print("| round | wall s | slowest node: task to ack s (download s) | overhead s | overhead share "
          "| nodes' training CPU s | 1.5 x CPU / cores + 2 s | collect s | aggregate s | evaluate s |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for t in table:
        print(f"| {t['round']} | {t['wall']:.2f} | {t['slowest_node']}: {t['slowest_span']:.2f} "
              f"({t['slowest_download']:.3f}) | {t['overhead']:.2f} | {t['share']:.1%} | {t['train_cpu']:.2f} "
              f"| {t['bound']:.2f} | {t['t_collect']} | {t['t_aggregate']} | {t['t_evaluate']} |")
    shares = [t["share"] for t in table]
    over = [t["overhead"] for t in table]
    print()
    print(f"rounds {len(table)}: overhead median {statistics.median(over):.2f} s, "
          f"share median {statistics.median(shares):.1%}, max {max(shares):.1%} (target <= 10%)")
    within = sum(t["wall"] <= t["bound"] for t in table)
    print(f"wall time within 1.5 x (training CPU / {os.cpu_count()} cores) + 2 s: {within} of {len(table)} rounds; "
          f"median wall / bound {statistics.median(t['wall'] / t['bound'] for t in table):.2f}")
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
