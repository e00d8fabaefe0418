"""``python -m orchestrator`` / ``byzfed-orchestrator``.

Commands:
  run SCENARIO [--set k=v ...]     orchestrator + one process per node, on this machine
  serve SCENARIO [--set k=v ...]   orchestrator only; nodes join from anywhere
  mpi SCENARIO [--set k=v ...]     one rank of an mpirun job (rank 0: orchestrator; ranks
                                   1..W-1: aggregation group; the rest: node hosts)
  defenses                         list the registered defenses and their parameters
  check SCENARIO [--set k=v ...]   validate a scenario file
  certs DIR [--host H ...] [--nodes a,b] [--scenario S]   a CA, server and client certificates
                                   (security.certs; orchestrator/security.py)
  enrol DIR [--nodes a,b] [--scenario S]   an enrolment key and DIR/<name>.secret per node
                                   (security.enrol_dir; orchestrator/enrolment.py)
  sweep SWEEP [--out DIR] [--parallel K] [--resume]   a grid of runs, results.csv and report.md
                                   (orchestrator/sweep.py)
  revoke RUN_DIR NAME [--cert PEM] [--serial HEX] [--sha256 HEX] [--file F]   revoke a node (and
                                   its certificate) while the run goes on (orchestrator/revocation.py)
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
        sp.add_argument("--tls", action="store_true",
                        help="TLS on every gRPC channel (sets security.tls = true; certificates: security.certs, "
                             "or a throwaway CA in RUN_DIR/certs)")
        sp.add_argument("--mtls", action="store_true",
                        help="mutual TLS: every node presents its own certificate (sets security.mtls = true)")
        if name != "check":
            sp.add_argument("--out", default=None, help="folder for run outputs (default: the scenario's output.dir)")
            sp.add_argument("--run-dir", default=None, help="exact run folder (resumes from its checkpoint if present)")
        if name in ("mpi", "run"):
            sp.add_argument("--token", default=os.environ.get("BYZFED_TOKEN"),
                            help="federation token (default: $BYZFED_TOKEN or random, chosen by rank 0); "
                                 "also what load sessions (roles.load) join with")
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
    rk.add_argument("--group-key-file", default="", help="0600 file holding the run's group key (64 hex digits; "
                                                         "default: $BYZFED_GROUP_KEY, as the launcher hands it)")
    ct = sub.add_parser("certs", help="write a CA, a server certificate and client certificates to a folder "
                                      "(security.certs)")
    ct.add_argument("dir", help="folder to write (an existing CA there, ca.pem + ca.key, is kept and reused)")
    ct.add_argument("--host", dest="hosts", action="append", default=[], metavar="H",
                    help="host name or IP the nodes dial (repeatable); 127.0.0.1, ::1 and localhost always")
    ct.add_argument("--nodes", action="append", default=[], metavar="NAMES",
                    help="client certificates for these node names (comma-separated, repeatable)")
    ct.add_argument("--scenario", default=None, help="client certificates for every node of this scenario")
    ct.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    en = sub.add_parser("enrol", help="write an enrolment key and a secret per node name to a folder "
                                      "(security.enrol, security.enrol_dir)")
    en.add_argument("dir", help="folder to write (an existing enrol.key there is kept and reused)")
    en.add_argument("--nodes", action="append", default=[], metavar="NAMES",
                    help="secrets for these node names (comma-separated, repeatable)")
    en.add_argument("--scenario", default=None, help="secrets for every node of this scenario")
    rv = sub.add_parser("revoke", help="revoke a node name (and a client certificate) of a run while it goes on "
                                       "(security.revoked; default RUN_DIR/revoked.txt)")
    rv.add_argument("run_dir", help="the run's folder (its scenario.json names the roster and security.revoked)")
    rv.add_argument("name", help="the node name to revoke")
    rv.add_argument("--cert", default=None, metavar="PEM",
                    help="also revoke this client certificate (by its serial and SHA-256 fingerprint)")
    rv.add_argument("--serial", action="append", default=[], metavar="HEX",
                    help="also revoke the client certificate of this serial number (repeatable)")
    rv.add_argument("--sha256", action="append", default=[], metavar="HEX",
                    help="also revoke the client certificate of this SHA-256 fingerprint (repeatable)")
    rv.add_argument("--file", default=None, metavar="F",
                    help="the revocation list to append to (default: the run's security.revoked, else "
                         "RUN_DIR/revoked.txt)")
    sub.add_parser("defenses", help="list the registered defenses")
    sub.add_parser("sweep", help="run a grid of scenarios (sweep file): results.csv and report.md")
    args = p.parse_args(argv)

    if args.cmd == "defenses":
        from .defenses import describe
        print(describe())
        return 0

    if args.cmd == "rank":
        return _rank(args)

    if args.cmd == "certs":
        return _certs(args)

    if args.cmd == "enrol":
        return _enrol(args)

    if args.cmd == "revoke":
        return _revoke(args)

    if getattr(args, "tls", False):
        args.overrides.append("security.tls=true")
    if getattr(args, "mtls", False):
        args.overrides.append("security.mtls=true")

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
        if scenario.security.certs and args.cmd != "check":
            from .security import bundle
            bundle(scenario, Path(args.run_dir or "."))  # (a given folder is only checked: its ca.pem)
        if scenario.security.enrol_dir and args.cmd != "check":
            from .enrolment import KEY_FILE
            if not (Path(scenario.security.enrol_dir) / KEY_FILE).is_file():
                raise FileNotFoundError(f"security.enrol_dir = {scenario.security.enrol_dir!r}: no {KEY_FILE} there "
                                        f"(make the folder with ./launch.sh enrol {scenario.security.enrol_dir} "
                                        f"--scenario {args.scenario})")
        if scenario.security.revoked and args.cmd != "check":
            from .revocation import Revocations
            Revocations.load(Path(scenario.security.revoked))  # (a bad line or a folder there: an error now)
    except (ScenarioError, ValueError, FileNotFoundError) as exc:
        print(f"scenario error: {exc}", file=sys.stderr)
        return 2
    if args.cmd == "check":
        print(f"{args.scenario}: ok ({scenario.num_nodes} nodes, {scenario.federation.rounds} rounds)")
        return 0

    from .checkpoint import CheckpointError
    from .group import GroupError
    from .runner import make_run_dir, run_scenario
    run_dir = Path(args.run_dir) if args.run_dir else make_run_dir(scenario, args.out, args.overrides)
    try:
        run_scenario(scenario, run_dir, spawn_nodes=(args.cmd == "run"),
                     token=getattr(args, "token", None))
    except KeyboardInterrupt:
        return 130
    except GroupError as exc:  # (NCCL, or the group could not re-form): the last checkpoint resumes it
        print(f"byzfed: {exc}\nthe run stopped; its last checkpoint resumes it: --run-dir {run_dir}", file=sys.stderr)
        return 1
    except CheckpointError as exc:
        print(f"byzfed: {exc}", file=sys.stderr)
        return 2
    return 0


def _node_names(args) -> list[str]:
    """The node names of ``certs``/``enrol``: ``--nodes`` lists, then ``--scenario``'s
    roster, each once."""
    from .scenario import load
    names = [n.strip() for text in args.nodes for n in text.split(",") if n.strip()]
    if args.scenario:
        names += [n for n, _ in load(args.scenario).node_roles()]
    return list(dict.fromkeys(names))


def _certs(args) -> int:
    from proto.certs import CertError, write_bundle

    from .scenario import ScenarioError
    try:
        names = _node_names(args)
        if not 1 <= args.days <= 3650:
            raise CertError(f"--days {args.days} must be in 1 .. 3650")
        d = write_bundle(Path(args.dir), args.hosts, names, days=args.days)
    except (ScenarioError, CertError, OSError) as exc:
        print(f"certs: {exc}", file=sys.stderr)
        return 2
    print(f"{d}: ca.pem, server.pem/server.key" + (f", clients/<name>.pem/.key for {len(names)} node(s)" if names
                                                  else "") + " (keys are mode 0600; keep ca.key off the node machines)")
    return 0


def _enrol(args) -> int:
    from proto.certs import CertError, check_name

    from .enrolment import write_folder
    from .scenario import ScenarioError
    try:
        names = _node_names(args)
        for n in names:
            check_name(n)  # (each names a file)
        write_folder(Path(args.dir), names)
    except (ScenarioError, CertError, OSError, ValueError) as exc:
        print(f"enrol: {exc}", file=sys.stderr)
        return 2
    print(f"{args.dir}: enrol.key" + (f", <name>.secret for {len(names)} node(s)" if names else "")
          + " (mode 0600; run with security.enrol = true, security.enrol_dir = this folder; give each node machine "
            "only its own <name>.secret: fednode --secret-file)")
    return 0


def _revoke(args) -> int:
    import json

    from .revocation import FILE, RevocationError, append, cert_id
    try:
        run_dir = Path(args.run_dir)
        if not run_dir.is_dir():
            raise RevocationError(f"run folder {str(run_dir)!r} does not exist")
        resolved = run_dir / "scenario.json"
        path = Path(args.file) if args.file else run_dir / FILE
        if resolved.is_file():
            raw = json.loads(resolved.read_text())
            if not args.file and (raw.get("security") or {}).get("revoked"):
                path = Path(raw["security"]["revoked"])
            # the roster as Scenario.node_roles names it, from the run's resolved (already checked)
            # scenario: loading it as a Scenario would import torch (seconds), for a list of names
            roster = [f"{r['name']}-{i:03d}" for r in raw.get("roles") or () for i in range(int(r["count"]))]
            if roster and args.name not in roster:
                raise RevocationError(f"node {args.name!r} is not in the run's roster ({resolved}): expected one "
                                      f"of {min(roster)!r} .. {max(roster)!r}")
        if args.name != args.name.strip() or any(c in args.name for c in " \t#") or not args.name:
            raise RevocationError(f"node name {args.name!r} cannot be listed (no spaces or '#')")
        lines = [f"name {args.name}"]
        lines += [f"serial {s}" for s in args.serial] + [f"sha256 {f}" for f in args.sha256]
        if args.cert:
            try:
                cid = cert_id(Path(args.cert).read_bytes())
            except OSError as exc:
                raise RevocationError(f"--cert {args.cert!r} cannot be read: {exc.strerror or exc}") from None
            lines += [f"serial {cid.serial}", f"sha256 {cid.sha256}"]
        append(path, lines)
    except (RevocationError, OSError, ValueError) as exc:
        print(f"revoke: {exc}", file=sys.stderr)
        return 2
    print(f"{path}: revoked node {args.name!r}" + (f" and {len(lines) - 1} certificate id(s)" if len(lines) > 1
                                                   else "") + " (the run's servers re-read it within about a second)")
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
    return follow(scenario, Path(args.run_dir), args.rank, args.world, args.rendezvous, args.advertise_host,
                  group_key_file=args.group_key_file)


if __name__ == "__main__":
    sys.exit(main())
