"""Scenario files: one declarative TOML file describes a whole run.

Every section is a frozen keyword-only dataclass; loading checks every key and
value, so a typo or a bad value is an error that names the key and the allowed
keys or values. ``--set section.key=value`` overrides apply before checking.
"""
from __future__ import annotations

import dataclasses
import math
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from fednode.config import TrainConfig

from .addresses import is_wildcard


class ScenarioError(ValueError):
    """A scenario file or override is invalid; the message names the key."""


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    name: Literal["logreg", "mlp", "cnn", "resnet18"] = "cnn"


@dataclass(frozen=True, kw_only=True)
class DataSection:
    dataset: str = "mnist5k"
    """mnist5k (bundled), digits (bundled), mnist, fashion-mnist, emnist, cifar10, medmnist:<flag>."""
    data_dir: str = ""
    partition: Literal["iid", "dirichlet", "quantity"] = "iid"
    alpha: float = 0.5
    test_fraction: float = 0.2


# The [training] section is exactly what a node is told about local training.
TrainingSection = TrainConfig


@dataclass(frozen=True, kw_only=True)
class FederationSection:
    rounds: int = 20
    selection: Literal["all", "sample"] = "all"
    sample_size: int = 0
    """Nodes per round in ``sample`` mode (cross-device)."""
    quorum: float = 0.5
    """Fraction (0, 1] of the selected nodes, or an absolute count when > 1."""
    round_timeout: float = 60.0
    """Deadline of each round, in seconds after it opens."""
    lease_seconds: float = 6.0
    min_nodes: int = 0
    """Nodes that must have joined before round 0 opens (0: all the scenario's nodes)."""
    join_timeout: float = 120.0
    server_lr: float = 1.0
    host: str = "127.0.0.1"
    """Address the orchestrator listens on (0.0.0.0 or :: for every interface)."""
    port: int = 0
    advertise_host: str = ""
    """Host (name or IP) that nodes on other machines reach this orchestrator at: nodes are told
    to upload to ``advertise_host:port`` and to dial the collusion service and the adversary view
    there. '' : the bind host when it is a concrete address; with a wildcard host (0.0.0.0, ::)
    nodes keep using the address they joined on. Never a wildcard itself."""
    over_selection: float = 1.0
    """Sample mode: select ceil(sample_size * over_selection) nodes and close the round once
    sample_size of them reported (the rest are refused as late)."""
    mode: Literal["sync", "async"] = "sync"
    """async: buffered asynchronous aggregation (FedBuff), see orchestrator/async_mode.py."""
    buffer_size: int = 10
    """Async: aggregate every this many accepted updates (B)."""
    max_staleness: int = 4
    """Async: refuse an update based on a model more than this many versions old."""
    staleness_weighting: Literal["constant", "polynomial"] = "polynomial"
    """Async: row weight 1, or (1 + staleness)^-staleness_exponent (FedBuff)."""
    staleness_exponent: float = 0.5
    idle_nodes: Literal["auto", "light", "warm"] = "auto"
    """light: a node sheds torch, model and data after each round (re-exec, same identity);
    warm: keeps them. auto: light for sync sample selection (cross-device), else warm."""
    sample_counts: Literal["assigned", "median"] = "assigned"
    """How self-reported sample counts are trusted before a rule weights by them: 'assigned' caps
    each at the node's assigned shard size; 'median' (nodes bring their own data) caps each at
    count_cap x the round's median claim (orchestrator/pipeline.py: trusted_counts)."""
    count_cap: float = 2.0
    """With sample_counts = 'median': the cap, as a multiple of the round's median claim."""
    train_slots: int = 0
    """At most this many local nodes compute at once (0: this machine's cores); fednode/slots.py."""


@dataclass(frozen=True, kw_only=True)
class DefenseSection:
    name: str = "mean"
    f: int = 0
    params: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class AggregationSection:
    ranks: int = 1
    """Orchestrator ranks in the aggregation group (``orchestrator/group.py``): rank 0 leads;
    every rank is an ingest endpoint; the defenses' work is split across them."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gather: Literal["gloo", "mpi", "auto"] = "gloo"
    """How CPU ranks gather the update rows: torch.distributed's gloo (always works), MPI
    (``mpirun`` jobs only; several times faster on CPUs, but an MPI collective has no
    timeout), or ``auto``: under ``mpirun`` the faster of the two, measured when the group
    forms (gloo elsewhere). CUDA ranks always use NCCL."""
    timeout_seconds: float = 120.0
    """A collective between ranks (or the group's rendezvous) fails after this long: a dead
    or hung rank ends the run with a clear error instead of a hang."""
    rerun_rounds: int = 1
    """When a rank dies during a round and the group re-forms without it, run that round
    again (same round, selection and model; its nodes train it again) at most this many
    times before abandoning it; 0: abandon it at once."""


@dataclass(frozen=True, kw_only=True)
class RoleSection:
    name: str = "honest"
    count: int = 1
    byzantine: bool = False
    attack: str = ""
    attack_params: dict = field(default_factory=dict)
    schedule: dict = field(default_factory=dict)
    join_at_round: int = 0
    leave_at_round: int = -1
    dropout: float = 0.0
    knowledge: str = ""
    """What the attack may read: '' (what the attack needs), 'own', 'colluders' or 'omniscient'."""
    join_after_seconds: float = 0.0
    """Start the node this many seconds after the run starts (0: with the others)."""
    rejoin_at_round: int = -1
    """After leave_at_round, start the node again at this round with the same credentials."""
    crash_phase: Literal["", "download", "train", "upload"] = ""
    """SIGKILL itself at this point of a round (fednode/churn.py), with crash_probability / crash_at_round."""
    crash_probability: float = 0.0
    """Per selected round, drawn from (seed, round, node)."""
    crash_at_round: int = -1
    restart_after_seconds: float = -1.0
    """After a crash (death by a signal), the launcher starts the node again this many seconds
    later with the same secret, so it gets its node id back (-1: never)."""
    latency_ms: float = 0.0
    """Added before every RPC the node makes."""
    slowdown: float = 1.0
    """Straggler: the node takes slowdown x its training time before uploading."""
    train_delay_s: float = 0.0
    """Straggler: a fixed extra delay before uploading."""
    load: bool = False
    """Load sessions only (``bench/sessions.py``): the launcher does not start these nodes and
    rounds never select them; they join from elsewhere, heartbeat and long-poll for tasks, and
    hold no data shard (the shards split among the other roles)."""


@dataclass(frozen=True, kw_only=True)
class AdversarySection:
    """What the Byzantine group may use besides the wire (see orchestrator/adversary.py)."""
    omniscient: bool = False
    """SIMULATION ONLY: serve each round's honest updates to Byzantine nodes (loud warning, own token)."""
    view_timeout: float = 10.0
    """Seconds the omniscient view waits for a round's honest uploads before serving what arrived."""
    allow_non_loopback: bool = False
    """Permit the omniscient view when federation.host is not a loopback address."""
    collusion: Literal["auto", "on", "off"] = "auto"
    """Collusion service: auto = when an attack needs colluders' updates or there are >= 2 Byzantine nodes."""
    collusion_timeout: float = 10.0
    """Seconds a colluder waits for the rest of its group's benign deltas."""


@dataclass(frozen=True, kw_only=True)
class SecuritySection:
    """TLS on every gRPC channel of the run (``orchestrator/security.py``)."""
    tls: bool = False
    """Nodes, aggregation ranks' ingest endpoints, the collusion service and the adversary view
    all speak TLS; nodes verify the server's certificate against the run's CA."""
    mtls: bool = False
    """Mutual TLS (implies tls): every client must present a certificate of the run's CA
    (one per node, CN = the node's name)."""
    certs: str = ""
    """Folder of a bundle made by ``./launch.sh certs`` (ca.pem, server.pem/.key,
    clients/<name>.pem/.key). '': a throwaway CA and certificates in RUN_DIR/certs."""
    token_seconds: float = 0.0
    """Epoch of a session token (``orchestrator/identity.py``): a token is accepted for its
    own epoch and one epoch either side, so it lives 1-2 x this long; heartbeats hand the
    node a fresh one when the epoch turns, an expired one makes the node re-join.
    0: ``max(600, federation.lease_seconds)`` (see :meth:`token_epoch`)."""

    def token_epoch(self, lease_seconds: float) -> float:
        return self.token_seconds or max(600.0, lease_seconds)
    enrol: bool = False
    """Enrolled node names (``orchestrator/enrolment.py``): a join must present its name's
    enrolment secret as its node secret, so the federation token alone takes no name."""
    enrol_dir: str = ""
    """Folder of ``./launch.sh enrol`` (enrol.key, <name>.secret). '': RUN_DIR/enrol."""
    rank_encryption: bool = False
    """Seal every collective between aggregation ranks (AES-GCM, ``orchestrator/ranksec.py``)
    even without TLS; with ``tls``/``mtls`` they are always sealed. Ranks always authenticate
    each other and the run's key always crosses sealed, whatever this says."""
    revoked: str = ""
    """Revocation list (``orchestrator/revocation.py``, ``./launch.sh revoke``): node names and
    client certificates (serial or SHA-256 fingerprint) refused while the run goes on; watched
    by mtime, re-read at most every second. '': RUN_DIR/revoked.txt."""

    @property
    def enabled(self) -> bool:
        return self.tls or self.mtls


@dataclass(frozen=True, kw_only=True)
class OutputSection:
    dir: str = "runs"
    checkpoint_every: int = 1
    plot: bool = True
    live: bool = True


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str = "scenario"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    federation: FederationSection = field(default_factory=FederationSection)
    defense: DefenseSection = field(default_factory=DefenseSection)
    adversary: AdversarySection = field(default_factory=AdversarySection)
    aggregation: AggregationSection = field(default_factory=AggregationSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    roles: tuple[RoleSection, ...] = (RoleSection(name="honest", count=10),)
    output: OutputSection = field(default_factory=OutputSection)

    @property
    def num_nodes(self) -> int:
        return sum(r.count for r in self.roles)

    @property
    def num_trainers(self) -> int:
        """The nodes rounds can select: every role but load sessions (``RoleSection.load``)."""
        return sum(r.count for r in self.roles if not r.load)

    def trainer_roles(self) -> list[tuple[str, RoleSection]]:
        """:meth:`node_roles` without load sessions: the nodes that hold data shards, in shard order."""
        return [(n, r) for n, r in self.node_roles() if not r.load]

    def node_roles(self) -> list[tuple[str, RoleSection]]:
        """``(node_name, role)`` for every node, in shard order."""
        out = []
        for role in self.roles:
            for i in range(role.count):
                out.append((f"{role.name}-{i:03d}", role))
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {f.name: f for f in dataclasses.fields(Scenario)}


INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1
"""Integers are 64-bit (TOML's range; they travel as int64 and seed 64-bit generators)."""
MAX_NESTING = 16
"""How deep a free-form table (``params``, ``attack_params``, ``schedule``) may nest."""


def _echo(value: Any, limit: int = 80) -> str:
    """A bounded ``repr`` of a value for an error message (a huge string, a deeply nested
    table or an integer too long for ``repr`` must not flood or break the message)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # e.g. a nested integer past Python's digit limit
        text = f"<a {type(value).__name__} that cannot be shown>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _check_free(path: str, value: Any, depth: int = 0) -> None:
    """A free-form table's contents: string keys, 64-bit integers, bounded nesting."""
    if depth > MAX_NESTING:
        raise ScenarioError(f"{path} nests deeper than {MAX_NESTING} levels")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ScenarioError(f"{path} has a key {_echo(k)} that is not a string")
            _check_free(f"{path}.{k}", v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_free(f"{path}[{i}]", v, depth + 1)
    elif isinstance(value, int) and not isinstance(value, bool) and not INT_MIN <= value <= INT_MAX:
        raise ScenarioError(f"{path} = {_echo(value)} is out of range: integers must be in -2**63 .. 2**63 - 1")


def _check_value(path: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) or not any(type(value) is type(a) and value == a for a in allowed):
            raise ScenarioError(f"{path} = {_echo(value)} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ScenarioError(f"{path} must be true or false, got {_echo(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{path} must be an integer, got {_echo(value)}")
        if not INT_MIN <= value <= INT_MAX:
            raise ScenarioError(f"{path} = {_echo(value)} is out of range: integers must be in -2**63 .. 2**63 - 1")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ScenarioError(f"{path} must be a finite number, got {_echo(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the largest float
            number = math.inf
        if not math.isfinite(number):
            raise ScenarioError(f"{path} must be a finite number, got {_echo(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ScenarioError(f"{path} must be a string, got {_echo(value)}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ScenarioError(f"{path} must be a table, got {_echo(value)}")
        _check_free(path, value)
        return dict(value)
    return value


def _build(cls: type, table: Any, path: str):
    if not isinstance(table, dict):
        raise ScenarioError(f"[{path}] must be a table, got {_echo(table)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in table.items():
        full = f"{path}.{key}" if path else str(key)
        if not isinstance(key, str) or key not in hints:
            raise ScenarioError(f"unknown key {_echo(full)}; allowed keys{' in [' + path + ']' if path else ''}: "
                                f"{', '.join(names)}")
        kwargs[key] = _check_value(full, value, hints[key])
    return cls(**kwargs)


def _validate(s: Scenario) -> None:
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ScenarioError(f"{key} {msg}")

    fed = s.federation
    need(fed.rounds >= 1, "federation.rounds", "must be >= 1")
    need(fed.round_timeout > 0, "federation.round_timeout", "must be > 0 seconds")
    need(fed.lease_seconds > 0, "federation.lease_seconds", "must be > 0 seconds")
    need(fed.quorum > 0, "federation.quorum", "must be > 0 (a fraction in (0, 1] or a count)")
    need(fed.selection != "sample" or fed.sample_size >= 1, "federation.sample_size", "must be >= 1 when selection = 'sample'")
    need(0 <= fed.port < 65536, "federation.port", "must be in 0..65535")
    need(not fed.advertise_host or not is_wildcard(fed.advertise_host), "federation.advertise_host",
         f"= {fed.advertise_host!r} is a wildcard (listen-only) address; give the host name or IP that "
         "nodes on other machines can reach, or '' to keep the address each node joined on")
    need(fed.advertise_host == fed.advertise_host.strip() and not fed.advertise_host.endswith(":")
         and (fed.advertise_host.count(":") != 1), "federation.advertise_host",
         f"= {fed.advertise_host!r} must be a host name or IP address without a port "
         "(the port is federation.port / the bound port)")
    need(fed.count_cap >= 1.0, "federation.count_cap", "must be >= 1 (a multiple of the round's median claim)")
    need(s.training.epochs >= 1, "training.epochs", "must be >= 1")
    need(s.training.batch_size >= 1, "training.batch_size", "must be >= 1")
    need(s.training.lr > 0, "training.lr", "must be > 0")
    need(0 < s.data.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
    need(s.data.alpha > 0, "data.alpha", "must be > 0")
    need(s.defense.f >= 0, "defense.f", "must be >= 0")
    need(1 <= s.aggregation.ranks <= 64, "aggregation.ranks", f"= {s.aggregation.ranks} must be in 1 .. 64")
    need(s.aggregation.ranks == 1 or fed.mode == "sync", "aggregation.ranks",
         f"= {s.aggregation.ranks}: several aggregation ranks run synchronous rounds only "
         "(with federation.mode = 'async' allowed: 1)")
    need(s.aggregation.timeout_seconds >= 5, "aggregation.timeout_seconds", "must be >= 5 seconds")
    need(not s.security.certs or s.security.enabled, "security.certs",
         f"= {s.security.certs!r} is set but TLS is off; set security.tls = true (or mtls = true), or leave it ''")
    need(s.security.certs == s.security.certs.strip(), "security.certs",
         f"= {s.security.certs!r} has leading or trailing spaces")
    need(s.security.token_seconds == 0 or 1 <= s.security.token_seconds <= 7 * 86400, "security.token_seconds",
         f"= {s.security.token_seconds:g} must be 0 (auto: max(600, lease_seconds)) or in 1 .. 604800 seconds")
    need(s.security.token_epoch(fed.lease_seconds) >= fed.lease_seconds / 2, "security.token_seconds",
         f"= {s.security.token_seconds:g} must be >= federation.lease_seconds / 2 = {fed.lease_seconds / 2:g} s: "
         "nodes heartbeat every lease_seconds / 3 and must pick up each rotated token before the old one expires")
    need(s.security.revoked == s.security.revoked.strip() and "\x00" not in s.security.revoked
         and not s.security.revoked.endswith("/"), "security.revoked",
         f"= {_echo(s.security.revoked)} must be a file path (no leading or trailing spaces, no trailing '/'), "
         "or '' for RUN_DIR/revoked.txt")
    need(not s.security.enrol_dir or s.security.enrol, "security.enrol_dir",
         f"= {s.security.enrol_dir!r} is set but security.enrol is off; set security.enrol = true, or leave it ''")
    if s.security.mtls or s.security.enrol:  # certificate and secret files are named after each node
        from proto.certs import CertError, check_name
        for i, r in enumerate(s.roles):
            try:
                check_name(f"{r.name}-000")
            except CertError:
                need(False, f"roles[{i}].name", f"= {_echo(r.name)}: with security.mtls or enrol node names name "
                     "certificate and secret files; use letters, digits, '.', '_' or '-', not starting with '.' or '-'")
    need(len(s.roles) >= 1 and s.num_nodes >= 1, "roles", "must describe at least one node")
    need(s.num_trainers >= 1, "roles", "must describe at least one node that is not a load session (load = false)")
    seen = set()
    for i, r in enumerate(s.roles):
        need(r.count >= 0, f"roles[{i}].count", "must be >= 0")
        need(r.name not in seen, f"roles[{i}].name", f"{r.name!r} is used by two roles")
        seen.add(r.name)
        need(0 <= r.dropout <= 1, f"roles[{i}].dropout", "must be in [0, 1]")
        need(not r.attack or r.byzantine, f"roles[{i}].attack", "needs byzantine = true")
        if r.load:
            need(not r.byzantine, f"roles[{i}].load", "load sessions are not Byzantine nodes (set byzantine = false)")
            need(s.federation.mode == "sync", f"roles[{i}].load",
                 f"load sessions need federation.mode = 'sync' (got {s.federation.mode!r}): async tasks go to any idle node")
        need(r.join_after_seconds >= 0, f"roles[{i}].join_after_seconds", "must be >= 0")
        need(r.rejoin_at_round < 0 or r.rejoin_at_round > r.leave_at_round >= 0, f"roles[{i}].rejoin_at_round",
             "needs leave_at_round >= 0 and must be > leave_at_round")
    from .checks import check_roles  # attack names, params, schedules and knowledge vs [adversary]
    check_roles(s, need)
    from .checks import check_churn  # crash/straggler role keys, async and cross-device federation keys
    check_churn(s, need)
    from .checks import check_sizes_and_training  # node counts, quorum, training.params
    check_sizes_and_training(s, need)
    from .checks import check_defense  # the rule and its parameters, and (n, f) pairs that can never work
    check_defense(s, need)


def _check_name(name: str) -> str:
    """The scenario's name names its run folder (``runs/<name>-<time>``): no path separators,
    control characters, '.' or '..', at most 200 characters."""
    bad = [c for c in name if c in "/\\" or ord(c) < 32 or ord(c) == 127]
    if not name.strip() or name in (".", "..") or len(name) > 200 or bad:
        raise ScenarioError(f"name = {_echo(name)} must be 1-200 characters without path separators or control "
                            "characters (it names the run's folder)")
    return name


def from_dict(raw: dict[str, Any]) -> Scenario:
    if not isinstance(raw, dict):
        raise ScenarioError(f"a scenario must be a table of sections, got {_echo(raw)}")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in _SECTIONS:
            raise ScenarioError(f"unknown key {_echo(key)}; allowed top-level keys: {', '.join(_SECTIONS)}")
        if key == "roles":
            if not isinstance(value, (list, tuple)) or not value:
                raise ScenarioError(f"roles must be a non-empty array of tables ([[roles]]), got {_echo(value)}")
            kwargs[key] = tuple(_build(RoleSection, v, f"roles[{i}]") for i, v in enumerate(value))
        elif key == "name":
            kwargs[key] = _check_name(_check_value(key, value, str))
        elif key == "seed":
            seed = _check_value(key, value, int)
            if seed < 0:
                raise ScenarioError(f"seed = {seed} must be >= 0 (it seeds numpy and torch generators)")
            kwargs[key] = seed
        else:
            section_cls = typing.get_type_hints(Scenario)[key]
            kwargs[key] = _build(section_cls, value, key)
    scenario = Scenario(**kwargs)
    _validate(scenario)
    return scenario


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value); the value is read as one TOML value, else as a string."""
    if not isinstance(text, str) or "=" not in text:
        raise ScenarioError(f"override {_echo(text)} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if any(not part.strip() for part in path):
        raise ScenarioError(f"override {_echo(text)} must look like section.key=value (an empty key in "
                            f"{_echo(key.strip())})")
    try:
        parsed = tomllib.loads(f"v = {raw}")
        value = parsed["v"] if list(parsed) == ["v"] else raw  # (a value with a newline and more keys: a string)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):  # (ValueError: an integer past Python's digit limit)
        value = raw
    return path, value


def _role_table(raw: dict[str, Any], path: list[str], text: str) -> dict[str, Any]:
    """The role table that ``roles.<name>.<key>[.<sub>...]=value`` addresses, by the role's
    name (a role is never addressed by its position: inserting a role must not silently
    retarget an override). Without ``[[roles]]`` in the file the default role ``honest``
    (10 nodes) is made explicit first. Replacing the whole array is refused."""
    roles = raw.get("roles")
    if roles is None:
        roles = raw["roles"] = [{"name": r.name, "count": r.count} for r in Scenario().roles]
    if not isinstance(roles, list) or not all(isinstance(r, dict) for r in roles):
        raise ScenarioError(f"override {_echo(text)}: roles must be an array of tables ([[roles]]) to be addressed")
    names = [str(r.get("name", RoleSection.name)) for r in roles]
    hint = f"address a role by its name: roles.<name>.<key>=value (roles: {', '.join(map(repr, names))})"
    if len(path) < 3:
        raise ScenarioError(f"override {_echo(text)}: roles cannot be replaced from the command line; {hint}")
    if path[1] not in names:
        raise ScenarioError(f"override {_echo(text)}: roles.{_echo(path[1], 40)} names no role; {hint}")
    keys = [f.name for f in dataclasses.fields(RoleSection)]
    if path[2] not in keys:
        raise ScenarioError(f"override {_echo(text)}: unknown key {_echo('.'.join(path[:3]))}; allowed keys in a "
                            f"role: {', '.join(keys)}")
    if path[2] == "name":
        raise ScenarioError(f"override {_echo(text)}: a role's name is how overrides address it; edit the file "
                            "to rename it")
    return roles[names.index(path[1])]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw (not yet checked) scenario table. ``section.key=value``
    sets a key (tables on the way are created); ``roles.<name>.<key>=value`` sets a key of
    the role named ``<name>`` (e.g. ``roles.byz.attack=alie``, ``roles.byz.count=3``,
    ``roles.byz.attack_params.z=1.5``). Everything is checked afterwards, by :func:`from_dict`."""
    for text in overrides:
        path, value = parse_override(text)
        node, start = raw, 0
        if path[0] == "roles":
            node, start = _role_table(raw, path, text), 2
        for i, part in enumerate(path[:-1]):
            if i < start:
                continue
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ScenarioError(f"override {_echo(text)}: {'.'.join(path[:i + 1])} is not a table")
        node[path[-1]] = value
    return raw


def load(path: str | Path, overrides: Optional[list[str]] = None) -> Scenario:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ScenarioError(f"scenario file {str(p)!r} does not exist") from None
    except OSError as exc:  # a directory, no permission, ...
        raise ScenarioError(f"scenario file {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")  # (a leading byte-order mark is fine)
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{p}: not valid TOML: not UTF-8 (byte {exc.start})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{p}: not valid TOML: {exc}") from None
    except ValueError as exc:  # an integer literal past Python's digit limit
        raise ScenarioError(f"{p}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ScenarioError(f"{p}: not valid TOML: arrays or tables nested too deeply") from None
    raw.setdefault("name", p.stem)
    return from_dict(apply_overrides(raw, overrides or []))
