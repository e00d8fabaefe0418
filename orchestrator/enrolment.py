"""Enrolled node names (``security.enrol``): a name joins only with the secret issued for it.

One enrolment key per run (32 random bytes in ``<folder>/enrol.key``, mode 0600) derives
each roster name's secret, ``HMAC(key, "enrol" | name)``; a join must present it as its
``Credentials.node_secret``, which also proves the node's re-joins (``membership``). So a
holder of the federation token cannot take a name whose secret it lacks, whether that
name already joined or not (no squatting). The folder is ``security.enrol_dir`` (made by
``./launch.sh enrol DIR --scenario S.toml``, which also writes ``DIR/<name>.secret`` for
each node, mode 0600: copy each to its node's machine, ``fednode --secret-file``) or, when
that is '', ``RUN_DIR/enrol`` (made on first use, with the same files; a resumed run reuses
its key). Locally launched nodes get their secret from the launcher in
``BYZFED_NODE_SECRET`` (``launch.node_env``), never on a command line.

A leaked ``<name>.secret`` stays valid for the key's life unless its name is revoked
(``revocation.py``, ``./launch.sh revoke``: the name's joins are then refused whatever
secret they present); a leaked ``enrol.key`` derives every name's secret (make a new
folder, i.e. new secrets for every node).
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from .errors import Refusal
from .scenario import Scenario

KEY_BYTES = 32
KEY_FILE = "enrol.key"
NOT_ENROLLED = "not-enrolled"
"""The ``byzfed-refusal`` trailing metadata value the servicer attaches to a :class:`NotEnrolled`."""


class NotEnrolled(Refusal):
    """A join whose node secret is not its name's enrolment secret: ``unauthenticated``."""

    def __init__(self, name: str) -> None:
        shown = repr(name) if len(name) <= 40 else f"{name[:40]!r}..."
        super().__init__("unauthenticated", f"node name {shown} is enrolled (security.enrol) and this join did not "
                                            "present its enrolment secret as the node secret (start the node with "
                                            "--secret-file <enrol folder>/<name>.secret)")
        self.name = name


@dataclass(frozen=True)
class Enrolment:
    key: bytes = field(default_factory=lambda: secrets.token_bytes(KEY_BYTES), repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ValueError(f"an enrolment key is {KEY_BYTES} bytes, got {len(self.key)}")

    def secret(self, name: str) -> str:
        return hmac.new(self.key, f"enrol|{name}".encode(), hashlib.sha256).hexdigest()[:48]

    def check(self, name: str, secret: str) -> None:
        """Refuse (:class:`NotEnrolled`) unless ``secret`` is ``name``'s enrolment secret."""
        if not hmac.compare_digest(self.secret(name).encode(), secret.encode()):
            raise NotEnrolled(name)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def write_folder(folder: Path, names: Iterable[str]) -> Enrolment:
    """The enrolment of ``folder``: its key (made when absent) and a ``<name>.secret`` per
    name (written when absent), all mode 0600, under a lock (ranks and launchers starting
    at once share one key)."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            key_file = d / KEY_FILE
            if not key_file.exists():
                _write_private(key_file, secrets.token_hex(KEY_BYTES) + "\n")
            enrolment = Enrolment(bytes.fromhex(key_file.read_text().strip()))
            for name in names:
                p = d / f"{name}.secret"
                if not p.exists():
                    _write_private(p, enrolment.secret(name) + "\n")
            return enrolment
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def folder_of(s: Scenario, run_dir: Path) -> Path:
    return Path(s.security.enrol_dir) if s.security.enrol_dir else Path(run_dir) / "enrol"


def enrolment_for(s: Scenario, run_dir: Path) -> Optional[Enrolment]:
    """The run's :class:`Enrolment` (None without ``security.enrol``). With
    ``security.enrol_dir`` the folder must hold its key already (``./launch.sh enrol``)."""
    if not s.security.enrol:
        return None
    d = folder_of(s, run_dir)
    if s.security.enrol_dir and not (d / KEY_FILE).is_file():
        raise FileNotFoundError(f"security.enrol_dir = {s.security.enrol_dir!r}: no {d / KEY_FILE} (make the folder "
                                f"with ./launch.sh enrol {s.security.enrol_dir} --scenario S.toml)")
    return write_folder(d, [n for n, _ in s.node_roles()])
