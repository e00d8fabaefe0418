"""``python -m fednode`` / ``fednode``: run one federated client process."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fednode", description="A byzfed client process.")
    p.add_argument("--orchestrator", required=True, help="host:port of the orchestrator")
    p.add_argument("--name", required=True, help="this node's name in the scenario (e.g. honest-003)")
    p.add_argument("--token", default=os.environ.get("BYZFED_TOKEN", ""),
                   help="federation enrolment token (default: $BYZFED_TOKEN)")
    p.add_argument("--secret", default=os.environ.get("BYZFED_NODE_SECRET"),
                   help="this node's secret for re-joins (default: random per process)")
    p.add_argument("--data-dir", default=None, help="folder with dataset files (IDX, CIFAR batches, .npz)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for local training")
    p.add_argument("--behaviour", default=None, help="JSON of the Byzantine behaviour (set by the launcher)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s {args.name} %(levelname)s %(message)s")
    if not args.token:
        print("fednode: --token (or $BYZFED_TOKEN) is required", file=sys.stderr)
        return 2
    from .node import Node, NodeConfig

    cfg = NodeConfig(address=args.orchestrator, name=args.name, federation_token=args.token,
                     data_dir=args.data_dir, threads=args.threads)
    if args.secret:
        cfg.secret = args.secret
    behaviour = None
    if args.behaviour:
        from .byzantine import Behaviour, BehaviourError
        try:
            behaviour = Behaviour.from_json(args.behaviour, args.name)
        except BehaviourError as exc:
            print(f"fednode {args.name}: refusing to start: {exc}", file=sys.stderr)
            return 2
    node = Node(cfg, behaviour)
    signal.signal(signal.SIGTERM, lambda *_: node.stop.set())
    try:
        return node.run()
    except KeyboardInterrupt:
        node.stop.set()
        return 130


if __name__ == "__main__":
    sys.exit(main())
