"""A non-leader aggregation rank's process: ``python -m orchestrator rank`` and the
aggregation ranks of an ``mpirun`` job. It composes the coordinator, its ingest server
and the group's :class:`~orchestrator.group.Follower` loop (kept out of ``group.py``,
which the coordinator imports)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import failpoints
from .addresses import is_wildcard
from .collective import pick_device
from .coordinator import Coordinator
from .group import Follower, GroupSpec, exchange_addresses, form, pick_gather
from .servicer import serve

log = logging.getLogger("orchestrator.group")


def follow(scenario, run_dir: Path, rank: int, world: int, rendezvous: str, advertise_host: str = "",
           mpi_comm: Any = None) -> int:
    """A non-leader aggregation rank's whole life: join the group, serve this rank's
    ingest endpoint, follow the leader's commands until ``STOP``. Returns an exit code
    (0: the leader ended the run; 1: the group failed and could not re-form with this
    rank in it)."""
    failpoints.set_rank(rank)
    spec = GroupSpec(rank, world, rendezvous, advertise_host)
    device = pick_device(scenario.aggregation.device)
    group, keys, roster = form(spec, device, scenario.aggregation.timeout_seconds)
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
