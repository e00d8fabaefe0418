"""A non-leader aggregation rank's process: ``python -m orchestrator rank`` and the
aggregation ranks of an ``mpirun`` job. It composes the coordinator, its ingest server
and the group's :class:`~orchestrator.group.Follower` loop (kept out of ``group.py``,
which the coordinator imports)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from . import failpoints
from .addresses import is_wildcard
from .collective import pick_device
from .coordinator import Coordinator
from .group import Follower, GroupError, GroupSpec, exchange_addresses, form, pick_gather, rank_encryption
from .ranksec import GROUP_KEY_ENV, GroupKeyError, group_key_from
from .servicer import serve

log = logging.getLogger("orchestrator.group")


def follow(scenario, run_dir: Path, rank: int, world: int, rendezvous: str, advertise_host: str = "",
           mpi_comm: Any = None, group_key: bytes = b"", group_key_file: str = "") -> int:
    """A non-leader aggregation rank's whole life: join the group, serve this rank's
    ingest endpoint, follow the leader's commands until ``STOP``. Returns an exit code
    (0: the leader ended the run; 1: the group failed and could not re-form with this
    rank in it, or this rank could not prove the run's group secret).

    The group secret: ``group_key``, else ``group_key_file``, else the environment
    (``ranksec.GROUP_KEY_ENV``, removed from it once read: nothing this rank starts
    inherits it)."""
    failpoints.set_rank(rank)
    try:
        key = group_key or group_key_from(group_key_file or None)
    except GroupKeyError as e:
        log.error("rank %d: %s", rank, e)
        return 1
    os.environ.pop(GROUP_KEY_ENV, None)
    spec = GroupSpec(rank, world, rendezvous, advertise_host, group_key=key or b"")
    device = pick_device(scenario.aggregation.device)
    try:
        group, keys, roster = form(spec, device, scenario.aggregation.timeout_seconds,
                                   encrypt=rank_encryption(scenario))
    except GroupError as e:
        log.error("rank %d could not join the aggregation group: %s", rank, e)
        return 1
    coord = Coordinator(scenario, run_dir, federation_token="", keys=keys, rank=rank, group=group)
    pick_gather(group, scenario, mpi_comm, coord.layout.d, device)
    advertise = advertise_host or scenario.federation.advertise_host
    host = "0.0.0.0" if advertise else scenario.federation.host
    if is_wildcard(host) and not advertise:
        host = "127.0.0.1"  # one machine: the other ranks and the nodes are here
    server, port = serve(coord, host, 0, 2 * scenario.num_nodes + 16, advertise_host=advertise)
    try:
        exchange_addresses(group, coord.ingest_address, device)
        log.info("rank %d of %d: ingest endpoint %s", rank, world, coord.ingest_address)
        return Follower(coord, group, roster).run()
    finally:
        coord.shutdown.set()
        server.stop(grace=1.0)
        roster.stop()
        group.close()
