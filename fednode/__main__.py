"""``python -m fednode`` / ``fednode``: run one federated client process."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fednode", description="A byzfed client process.")
    p.add_argument("--orchestrator", required=True, help="host:port of the orchestrator")
    p.add_argument("--name", required=True, help="this node's name in the scenario (e.g. honest-003)")
    p.add_argument("--token", default=os.environ.get("BYZFED_TOKEN", ""),
                   help="federation enrolment token (default: $BYZFED_TOKEN; prefer the variable: a command "
                        "line is visible to every user of the machine)")
    p.add_argument("--token-file", default=os.environ.get("BYZFED_TOKEN_FILE", ""),
                   help="read the federation token from this file (e.g. RUN_DIR/federation.token, mode 0600)")
    p.add_argument("--tls-ca", default=os.environ.get("BYZFED_TLS_CA", ""),
                   help="CA certificate (PEM) to verify the orchestrator with: TLS on every channel "
                        "(default: $BYZFED_TLS_CA; none: plaintext)")
    p.add_argument("--tls-cert", default=os.environ.get("BYZFED_TLS_CERT", ""),
                   help="this node's client certificate (PEM) for mutual TLS (default: $BYZFED_TLS_CERT)")
    p.add_argument("--tls-key", default=os.environ.get("BYZFED_TLS_KEY", ""),
                   help="the client certificate's private key (PEM) (default: $BYZFED_TLS_KEY)")
    p.add_argument("--secret", default=os.environ.get("BYZFED_NODE_SECRET"),
                   help="this node's secret for re-joins; with security.enrol its enrolment secret "
                        "(default: $BYZFED_NODE_SECRET, else random per process; prefer --secret-file)")
    p.add_argument("--secret-file", default=os.environ.get("BYZFED_NODE_SECRET_FILE", ""),
                   help="read the node secret from this file (security.enrol: ENROL_DIR/<name>.secret of "
                        "./launch.sh enrol, mode 0600)")
    p.add_argument("--data-dir", default=None, help="folder with dataset files (IDX, CIFAR batches, .npz)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for local training")
    p.add_argument("--behaviour", default=os.environ.get("BYZFED_BEHAVIOUR") or None,
                   help="JSON of the Byzantine behaviour (default: $BYZFED_BEHAVIOUR, where the launcher puts it: "
                        "it holds the collusion group's token)")
    p.add_argument("--behaviour-checked", action="store_true",
                   help="the launcher checked --behaviour against the scenario: build it at the first round "
                        "(keeps an idle node torch-free) instead of at start-up")
    p.add_argument("--churn", default="", help="JSON of the role's self-inflicted churn: crash_phase, "
                   "crash_probability, crash_at_round, latency_ms, slowdown, train_delay_s, seed")
    p.add_argument("--train-slots", type=int, default=0,
                   help="at most this many nodes of this machine compute at once (0: no limit)")
    p.add_argument("--slot-dir", default=None, help="folder of the training-slot lock files shared by this "
                   "machine's nodes (default: <tmp>/byzfed-train-slots)")
    p.add_argument("--idle", choices=("warm", "light"), default="warm",
                   help="light: shed torch, model and data after each round by re-executing (same PID and "
                        "identity); warm: keep them loaded")
    p.add_argument("--state-dir", default=None,
                   help="keep the local algorithm's per-node state (FedDyn, FedSpeed) in this folder, one file per "
                        "round trained, so it survives a restart of this node (the launcher passes "
                        "RUN_DIR/nodes/<name>; none: in memory only)")
    p.add_argument("--after-round", type=int, default=-1, help=argparse.SUPPRESS)  # set by a light re-exec
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s {args.name} %(levelname)s %(message)s")
    for field, flag in (("token", "--token-file"), ("secret", "--secret-file")):
        path = getattr(args, f"{field}_file")
        if path and not getattr(args, field):
            try:
                with open(path, encoding="utf-8") as f:
                    setattr(args, field, f.read().strip())
            except OSError as exc:
                print(f"fednode: cannot read {flag} {path}: {exc.strerror}", file=sys.stderr)
                return 2
    if not args.token:
        print("fednode: --token-file, $BYZFED_TOKEN or --token is required", file=sys.stderr)
        return 2
    from proto import tls
    try:
        if args.tls_ca:
            files = tls.ClientTls(args.tls_ca, args.tls_cert, args.tls_key)
            files.credentials()  # (read now: a missing file refuses the start, not the first call)
            tls.configure(files)
        elif args.tls_cert or args.tls_key:
            raise tls.TlsError("--tls-cert/--tls-key need --tls-ca (the CA that signed the orchestrator's certificate)")
        else:
            tls.configure(None)
    except tls.TlsError as exc:
        print(f"fednode {args.name}: refusing to start: {exc}", file=sys.stderr)
        return 2
    from .churn import ChurnError, ChurnSpec
    from .client import quiet_waits
    from .node import DeferredBehaviour, Node, NodeConfig

    quiet_waits()

    slot_dir = args.slot_dir or os.path.join(tempfile.gettempdir(), "byzfed-train-slots")
    cfg = NodeConfig(address=args.orchestrator, name=args.name, federation_token=args.token,
                     data_dir=args.data_dir, threads=args.threads, churn=args.churn, train_slots=args.train_slots,
                     slot_dir=slot_dir, idle=args.idle, after_round=args.after_round,
                     state_dir=args.state_dir)
    if args.secret:
        cfg.secret = args.secret
    try:
        if args.churn:
            ChurnSpec.from_json(args.churn)
    except ChurnError as exc:
        print(f"fednode {args.name}: refusing to start: {exc}", file=sys.stderr)
        return 2
    behaviour = None
    if args.behaviour and args.behaviour_checked:
        behaviour = DeferredBehaviour(args.behaviour, args.name)
    elif args.behaviour:
        from .byzantine import Behaviour, BehaviourError
        try:
            behaviour = Behaviour.from_json(args.behaviour, args.name)
        except BehaviourError as exc:
            print(f"fednode {args.name}: refusing to start: {exc}", file=sys.stderr)
            return 2
    if os.environ.get("BYZFED_FORKED") == "1":  # (fednode/forkserver.py: torch is in this image already)
        cfg.shed_in_place = True
    else:
        cfg.relaunch = lambda after_round: _relaunch(argv, cfg.secret, after_round, bool(args.behaviour))
    node = Node(cfg, behaviour)
    signal.signal(signal.SIGTERM, lambda *_: node.stop.set())
    try:
        return node.run()
    except KeyboardInterrupt:
        node.stop.set()
        return 130


def _relaunch(argv, secret: str, after_round: int, checked: bool) -> None:
    """Replace this process with a fresh node (same PID, same secret: the re-join gets the
    same node id) that skips the rounds up to ``after_round``. Never returns."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--after-round" in args:
        i = args.index("--after-round")
        del args[i:i + 2]
    args += ["--after-round", str(after_round)]
    if checked and "--behaviour-checked" not in args:
        args.append("--behaviour-checked")
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execve(sys.executable, [sys.executable, "-m", "fednode", *args], {**os.environ, "BYZFED_NODE_SECRET": secret})


if __name__ == "__main__":
    sys.exit(main())
