"""``python -m orchestrator`` / ``byzfed-orchestrator``.

Commands:
  run SCENARIO [--set k=v ...]     orchestrator + one process per node, on this machine
  serve SCENARIO [--set k=v ...]   orchestrator only; nodes join from anywhere
  defenses                         list the registered defenses and their parameters
  check SCENARIO [--set k=v ...]   validate a scenario file
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="byzfed-orchestrator", description="byzfed orchestrator")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, hlp in (("run", "run a scenario with local node processes"),
                      ("serve", "run the orchestrator only; nodes join over the network"),
                      ("check", "validate a scenario file")):
        sp = sub.add_parser(name, help=hlp)
        sp.add_argument("scenario")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a scenario value, e.g. --set federation.rounds=5")
        if name != "check":
            sp.add_argument("--out", default=None, help="folder for run outputs (default: the scenario's output.dir)")
            sp.add_argument("--run-dir", default=None, help="exact run folder (resumes from its checkpoint if present)")
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
    sub.add_parser("defenses", help="list the registered defenses")
    args = p.parse_args(argv)

    if args.cmd == "defenses":
        from .defenses import describe
        print(describe())
        return 0

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

    from .runner import make_run_dir, run_scenario
    run_dir = Path(args.run_dir) if args.run_dir else make_run_dir(scenario, args.out)
    try:
        run_scenario(scenario, run_dir, spawn_nodes=(args.cmd == "run"),
                     token=getattr(args, "token", None))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
