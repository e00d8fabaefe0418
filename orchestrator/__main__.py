"""``python -m orchestrator`` / ``byzfed-orchestrator``.

Commands:
  run SCENARIO [--set k=v ...]     orchestrator + one process per node, on this machine
  serve SCENARIO [--set k=v ...]   orchestrator only; nodes join from anywhere
  mpi SCENARIO [--set k=v ...]     one rank of an mpirun job (rank 0: orchestrator; ranks
                                   1..W-1: aggregation group; the rest: node hosts)
  defenses                         list the registered defenses and their parameters
  check SCENARIO [--set k=v ...]   validate a scenario file
  sweep SWEEP [--out DIR] [--parallel K] [--resume]   a grid of runs, results.csv and report.md
                                   (orchestrator/sweep.py)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sweep"]:  # its own parser (orchestrator/sweep.py)
        from .sweep import main as sweep_main
        return sweep_main(argv[1:])
    p = argparse.ArgumentParser(prog="byzfed-orchestrator", description="byzfed orchestrator")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, hlp in (("run", "run a scenario with local node processes"),
                      ("serve", "run the orchestrator only; nodes join over the network"),
                      ("mpi", "one rank of an mpirun job: orchestrator, aggregation rank or node host"),
                      ("check", "validate a scenario file")):
        sp = sub.add_parser(name, help=hlp)
        sp.add_argument("scenario")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a scenario value, e.g. --set federation.rounds=5")
        if name != "check":
            sp.add_argument("--out", default=None, help="folder for run outputs (default: the scenario's output.dir)")
            sp.add_argument("--run-dir", default=None, help="exact run folder (resumes from its checkpoint if present)")
        if name == "mpi":
            sp.add_argument("--token", default=os.environ.get("BYZFED_TOKEN"),
                            help="federation token (default: $BYZFED_TOKEN or random, chosen by rank 0)")
        if name == "serve":
            sp.add_argument("--host", default=None, help="listen address (default: federation.host)")
            sp.add_argument("--port", type=int, default=None, help="listen port (default: federation.port)")
            sp.add_argument("--advertise-host", default=None,
                            help="host or IP that nodes on other machines reach this orchestrator at, handed to "
                                 "them for uploads and the Byzantine services (default: "
                                 "federation.advertise_host; with --host 0.0.0.0 and none, nodes keep the "
                                 "address they joined on)")
            sp.add_argument("--token", default=os.environ.get("BYZFED_TOKEN"),
                            help="federation token nodes must present (default: $BYZFED_TOKEN or random)")
    rk = sub.add_parser("rank", help="one aggregation rank (not the leader) of a group: its ingest endpoint and "
                                     "its share of the defenses' work (started by `run` and `mpi`)")
    rk.add_argument("scenario", help="scenario file (.toml) or a run's resolved scenario.json")
    rk.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    rk.add_argument("--rank", type=int, required=True)
    rk.add_argument("--world", type=int, required=True)
    rk.add_argument("--rendezvous", required=True, help="tcp://HOST:PORT of rank 0's group store")
    rk.add_argument("--run-dir", required=True)
    rk.add_argument("--advertise-host", default="", help="host or IP nodes on other machines reach this rank at")
    sub.add_parser("defenses", help="list the registered defenses")
    sub.add_parser("sweep", help="run a grid of scenarios (sweep file): results.csv and report.md")
    args = p.parse_args(argv)

    if args.cmd == "defenses":
        from .defenses import describe
        print(describe())
        return 0

    if args.cmd == "rank":
        return _rank(args)

    if args.cmd == "mpi":  # each rank loads and checks what its part needs
        from .mpi import main as mpi_main
        return mpi_main(args.scenario, list(args.overrides), args.out, args.run_dir, args.token)

    from .scenario import ScenarioError, load
    overrides = list(args.overrides)
    if args.cmd == "serve":
        if args.host:
            overrides.append(f"federation.host={args.host!r}".replace("'", '"'))
        if args.port is not None:
            overrides.append(f"federation.port={args.port}")
        if args.advertise_host is not None:
            overrides.append(f"federation.advertise_host={args.advertise_host!r}".replace("'", '"'))
    try:
        scenario = load(args.scenario, overrides)
        from .defenses import build_defense
        build_defense(scenario.defense.name, scenario.defense.params)
    except (ScenarioError, ValueError) as exc:
        print(f"scenario error: {exc}", file=sys.stderr)
        return 2
    if args.cmd == "check":
        print(f"{args.scenario}: ok ({scenario.num_nodes} nodes, {scenario.federation.rounds} rounds)")
        return 0

    from .group import GroupError
    from .runner import make_run_dir, run_scenario
    run_dir = Path(args.run_dir) if args.run_dir else make_run_dir(scenario, args.out)
    try:
        run_scenario(scenario, run_dir, spawn_nodes=(args.cmd == "run"),
                     token=getattr(args, "token", None))
    except KeyboardInterrupt:
        return 130
    except GroupError as exc:  # (NCCL, or the group could not re-form): the last checkpoint resumes it
        print(f"byzfed: {exc}\nthe run stopped; its last checkpoint resumes it: --run-dir {run_dir}", file=sys.stderr)
        return 1
    return 0


def _rank(args) -> int:
    import json
    import logging

    from .rank import follow
    from .scenario import ScenarioError, from_dict, load
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {args.rank} %(levelname)s %(message)s")
    try:
        if args.scenario.endswith(".json"):
            scenario = from_dict(json.loads(Path(args.scenario).read_text()))
        else:
            scenario = load(args.scenario, list(args.overrides))
    except (ScenarioError, ValueError, OSError) as exc:
        print(f"scenario error: {exc}", file=sys.stderr)
        return 2
    return follow(scenario, Path(args.run_dir), args.rank, args.world, args.rendezvous, args.advertise_host)


if __name__ == "__main__":
    sys.exit(main())
