"""Revoked node names and client certificates (``[security] revoked``), while a run goes on.

The list is a text file, ``security.revoked`` or, when that is '', ``RUN_DIR/revoked.txt``
(:func:`path_of`); ``./launch.sh revoke RUN_DIR NAME [--cert PEM]`` appends to it
(:func:`append`: the whole file rewritten to a temporary file, mode 0600, and renamed over
it under a lock, so a reader never sees half a line). One entry a line::

    # comments and blank lines are ignored
    name honest-003                 # a node name (a line of one word is a name too)
    serial 5f3a9c...                # a client certificate's serial number (hex, ':' allowed)
    sha256 9b:0e:...                # a client certificate's SHA-256 fingerprint (of its DER)

Every server of the run (the leader and each aggregation rank's ingest endpoint:
``servicer.serve``) holds a :class:`Revocations` of the same path and looks at the file's
mtime, size and inode at most every ``min_interval`` seconds (1 s), re-reading it when
they changed. Removing a line lifts that revocation (a node evicted as revoked may then
join again). A bad line is an error when the run starts (:meth:`Revocations.load`, strict)
and, in a file edited while the run goes on, logged and skipped (the other lines apply).

What a revocation does is the servicer's and membership's (``servicer.py``,
``membership.py``): a revoked name's ``Join`` is refused, ``PERMISSION_DENIED "node 'x' is
revoked"``; its session ends at its next heartbeat, task poll or upload (the same status);
the leader evicts it with reason "revoked" within about a second, so it is never
selected again; under mutual TLS every call on a connection whose client certificate is
revoked is refused, whatever name it claims. Certificates are checked per call, not in
the TLS handshake (gRPC's Python server has no CRL hook).
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import Refusal

log = logging.getLogger("orchestrator.revocation")

FILE = "revoked.txt"
KINDS = ("name", "serial", "sha256")
_HEX = re.compile(r"^[0-9a-f]+$")


REVOKED = "revoked"
"""The ``byzfed-refusal`` trailing metadata value the servicer attaches to a :class:`Revoked`."""


class Revoked(Refusal):
    """A call of a revoked node name or on a connection with a revoked client certificate:
    ``permission_denied``."""

    def __init__(self, message: str) -> None:
        super().__init__("permission_denied", message)


class RevocationError(ValueError):
    """A revocation list line (or a ``revoke`` argument) that is not an entry; the message
    names the file, the line and the allowed forms."""


def path_of(s, run_dir: Path) -> Path:
    """The run's revocation list: ``security.revoked`` or ``RUN_DIR/revoked.txt``."""
    p = getattr(getattr(s, "security", None), "revoked", "") or ""
    return Path(p) if p else Path(run_dir) / FILE


def _hex(value: str) -> str:
    return value.strip().lower().replace(":", "")


def parse_line(line: str) -> Optional[tuple[str, str]]:
    """``(kind, value)`` of one line (None: blank or a comment); :class:`RevocationError`
    when it is not an entry. Serials are normalised to lower-case hex without leading
    zeros, fingerprints to 64 lower-case hex digits."""
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    parts = text.split()
    if len(parts) == 1:
        parts = ["name", parts[0]]
    if len(parts) != 2 or parts[0] not in KINDS:
        raise RevocationError(f"{line.strip()!r} is not an entry: one of 'name NODE', 'serial HEX', 'sha256 HEX' "
                              "(or a bare node name)")
    kind, value = parts
    if kind == "name":
        if len(value) > 128:
            raise RevocationError(f"node name of {len(value)} chars is over 128")
        return kind, value
    h = _hex(value)
    if not _HEX.match(h):
        raise RevocationError(f"{kind} {value!r} is not hexadecimal")
    if kind == "serial":
        return kind, format(int(h, 16), "x")
    if len(h) != 64:
        raise RevocationError(f"sha256 fingerprint {value!r} has {len(h)} hex digits, not 64")
    return kind, h


@dataclass(frozen=True)
class Entries:
    names: frozenset = frozenset()
    serials: frozenset = frozenset()
    fingerprints: frozenset = frozenset()

    def __len__(self) -> int:
        return len(self.names) + len(self.serials) + len(self.fingerprints)


def parse(text: str, where: str, strict: bool) -> Entries:
    """The entries of a list's ``text``; a bad line raises (``strict``) or is logged and skipped."""
    out: dict[str, set] = {k: set() for k in KINDS}
    for i, line in enumerate(text.splitlines(), 1):
        try:
            e = parse_line(line)
        except RevocationError as exc:
            if strict:
                raise RevocationError(f"{where}, line {i}: {exc}") from None
            log.error("revocation list %s, line %d: %s; line skipped", where, i, exc)
            continue
        if e is not None:
            out[e[0]].add(e[1])
    return Entries(frozenset(out["name"]), frozenset(out["serial"]), frozenset(out["sha256"]))


@dataclass(frozen=True)
class CertId:
    serial: str
    """Lower-case hex, no leading zeros (as :func:`parse_line` normalises)."""
    sha256: str
    """SHA-256 of the certificate's DER, 64 lower-case hex digits."""
    subject: str = ""


def cert_id(pem: bytes) -> CertId:
    """Serial and SHA-256 fingerprint of a PEM certificate (the ``cryptography`` library)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise RevocationError(f"not a PEM certificate: {exc}") from None
    try:
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        subject = str(cn[0].value) if cn else cert.subject.rfc4514_string()
    except ValueError:
        subject = ""
    return CertId(format(cert.serial_number, "x"), cert.fingerprint(hashes.SHA256()).hex(), subject)


class Revocations:
    """The revocation list of one server process, re-read when the file changed (looked at
    at most every ``min_interval`` seconds). Thread-safe."""

    def __init__(self, path: Path, min_interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.min_interval = min_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._sig: Optional[tuple] = None
        self._next = -float("inf")
        self.entries = Entries()
        self.reloads = 0
        self._certs: dict[bytes, CertId] = {}

    @classmethod
    def load(cls, path: Path, **kwargs) -> "Revocations":
        """The list at ``path``, read now, strictly (a bad line or a folder there raises
        :class:`RevocationError`); a missing file is an empty list (appended to later)."""
        r = cls(path, **kwargs)
        if r.path.is_dir():
            raise RevocationError(f"security.revoked = {str(path)!r} is a folder; name a file (e.g. {path}/{FILE})")
        r._refresh(force=True, strict=True)
        return r

    def _signature(self) -> Optional[tuple]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _refresh(self, force: bool = False, strict: bool = False) -> Entries:
        now = self._clock()
        with self._lock:
            if not force and now < self._next:
                return self.entries
            self._next = now + self.min_interval
            try:
                sig = self._signature()
                if sig == self._sig and not force:
                    return self.entries
                text = self.path.read_text(errors="replace") if sig is not None else ""
            except OSError as exc:  # (unreadable now: keep what was read last)
                if strict:
                    raise RevocationError(f"security.revoked = {str(self.path)!r} cannot be read: "
                                          f"{exc.strerror or exc}") from None
                log.error("revocation list %s cannot be read (%s); keeping the last one read", self.path, exc)
                return self.entries
            entries = parse(text, str(self.path), strict)
            if sig != self._sig and (self._sig is not None or entries):
                log.warning("revocation list %s: %d name(s), %d certificate serial(s), %d fingerprint(s)",
                            self.path, len(entries.names), len(entries.serials), len(entries.fingerprints))
            self._sig, self.entries = sig, entries
            self.reloads += 1
            return entries

    def current(self) -> Entries:
        return self._refresh()

    def name_revoked(self, name: str) -> bool:
        return name in self._refresh().names

    def cert_revoked(self, pem: bytes) -> Optional[CertId]:
        """The certificate's id when ``pem`` (a client certificate) is revoked, else None."""
        e = self._refresh()
        if not (e.serials or e.fingerprints) or not pem:
            return None
        cid = self._certs.get(pem)
        if cid is None:
            try:
                cid = cert_id(pem)
            except RevocationError:
                return None
            if len(self._certs) > 4096:
                self._certs.clear()
            self._certs[pem] = cid
        return cid if (cid.serial in e.serials or cid.sha256 in e.fingerprints) else None


def name_message(name: str) -> str:
    shown = repr(name) if len(name) <= 40 else f"{name[:40]!r}..."
    return f"node {shown} is revoked"


def cert_message(cid: CertId) -> str:
    return (f"client certificate of {cid.subject!r} (serial {cid.serial}, sha256 {cid.sha256[:16]}...) "
            "is revoked")


def append(path: Path, lines: list[str]) -> Path:
    """Add ``lines`` (each checked with :func:`parse_line`) to the list at ``path``: the old
    content plus the new lines written to a temporary file (mode 0600) and renamed over the
    list, under a lock on ``<path>.lock``, so concurrent writers and readers never see a
    partial file. Lines already there are not repeated."""
    for line in lines:
        parse_line(line)
    path = Path(path)
    if path.is_dir():
        raise RevocationError(f"{path} is a folder; name the revocation list file")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        os.chmod(lock.name, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            old = path.read_text() if path.exists() else "# byzfed revocation list (./launch.sh revoke)\n"
            have = {parse_line(x) for x in old.splitlines() if _safe(x)}
            new = [x for x in lines if parse_line(x) not in have]
            text = old if old.endswith("\n") or not old else old + "\n"
            text += "".join(f"{x}\n" for x in new)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
            try:
                with os.fdopen(fd, "w") as f:  # (mkstemp: mode 0600)
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def _safe(line: str) -> bool:
    try:
        return parse_line(line) is not None
    except RevocationError:
        return False
