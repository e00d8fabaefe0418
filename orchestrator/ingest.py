"""One ingest endpoint's upload path: the ledger's checks around the row store's rows.

``begin`` checks an upload's header against the ledger (sync ``RoundKeeper`` or
async ``AsyncKeeper``: round, model version, selection, one upload at a time,
the task's nonce) and claims the node's row; ``session`` opens an
:class:`UploadSession` on it, which the servicer feeds chunk by chunk as they
arrive (``add``), writing them straight into that row; ``finish`` checks the
stream (length, CRC, finiteness) and records the upload; ``abort`` gives
everything back. A refused or broken upload leaves the other rows and the
ledger's other entries untouched. No gRPC here: refusals are
:class:`~orchestrator.errors.Refusal` and the servicer maps them to status codes.

:meth:`Ingest.receive` drives a whole session from an iterator of chunks (for
in-process callers and tests).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from proto import codec
from proto.byzfed.v1 import federation_pb2 as pb

from .errors import Refusal
from .rounds import Upload
from .rowstore import RowStore, SealedError, Slot

CODEC_REASON = {"dtype": "invalid", "size": "invalid", "truncated": "invalid", "oversized": "too_large",
                "checksum": "checksum"}


@dataclass
class Receipt:
    """An upload in progress: the ledger's ticket (a ``Round`` or async ``Ticket``) and its row."""

    ticket: Any
    node_id: str
    slot: Slot
    started: float


class UploadSession:
    """One upload fed incrementally: ``add(chunk)`` as chunks arrive, then ``finish()``
    (or ``abort(reason)``). Every refusal is raised as a :class:`Refusal` after the
    session gave everything back (row and ledger entry); after that (or after
    ``finish``) the session is closed and ``abort`` is a no-op."""

    def __init__(self, ingest: "Ingest", receipt: Receipt, header: pb.TensorHeader, num_samples: int) -> None:
        self.ingest = ingest
        self.receipt = receipt
        self.num_samples = int(num_samples)
        self.closed = False
        self.finishing = False
        """Set by a caller that hands ``finish`` to another thread (then it must not ``abort``)."""
        try:
            self._asm = codec.Assembler(header, expected_bytes=ingest.d * 4, writer=receipt.slot.write)
        except codec.CodecError as e:
            self.abort(CODEC_REASON[e.reason])
            raise Refusal(CODEC_REASON[e.reason], str(e)) from None

    @property
    def received(self) -> int:
        return self._asm.received

    @property
    def short(self) -> bool:
        """Fewer bytes arrived than the header declared (a stream that ended here broke off
        or was closed early)."""
        return self._asm.received < self._asm.header.num_bytes

    def add(self, data: bytes) -> None:
        """Decode one chunk straight into the row."""
        if self.closed:
            raise Refusal("invalid", "the upload is already closed")
        try:
            self._asm.add(data)
        except codec.CodecError as e:
            self.abort(CODEC_REASON[e.reason])
            raise Refusal(CODEC_REASON[e.reason], str(e)) from None
        except SealedError:  # the round closed while this stream was still coming in: a late upload
            self._late()

    def finish(self) -> Upload:
        """Check the whole stream (length, CRC, finiteness) and record the upload."""
        if self.closed:
            raise Refusal("invalid", "the upload is already closed")
        r, ingest = self.receipt, self.ingest
        try:
            self._asm.check()
            bad = codec.count_nonfinite(r.slot.row)
            if bad:
                raise Refusal("invalid", f"update has {bad} non-finite values (NaN or Inf)")
        except codec.CodecError as e:
            self.abort(CODEC_REASON[e.reason])
            raise Refusal(CODEC_REASON[e.reason], str(e)) from None
        except Refusal as e:
            self.abort(e.reason)
            raise
        self.closed = True
        upload = Upload(r.node_id, self.num_samples, self._asm.received, time.monotonic() - r.started)
        try:
            ingest.keeper.finish_upload(r.ticket, upload)
        except Refusal as e:
            ingest.store.release(r.node_id)
            ingest.keeper.count_refusal(e.reason)
            raise
        return upload

    def abort(self, reason: str) -> None:
        """Give everything back (``broken_stream`` also ends the node's part in the round)."""
        if not self.closed:
            self.closed = True
            self.ingest.abort(self.receipt, reason)

    def _late(self) -> None:
        r, ingest = self.receipt, self.ingest
        self.closed = True
        ingest.store.release(r.node_id)
        try:
            ingest.keeper.finish_upload(r.ticket, Upload(r.node_id, self.num_samples, 0, 0.0))
        except Refusal as e:
            ingest.keeper.count_refusal(e.reason)
            raise e from None
        raise AssertionError("a sealed round accepted an upload")  # the ledger closes before the store seals


class Ingest:
    def __init__(self, keeper, store: RowStore, d: int,
                 elsewhere: Optional[Callable[[str], Optional[str]]] = None) -> None:
        """``elsewhere(node_id)``: why that node's uploads belong to another ingest rank
        (a message), or None when they belong here."""
        self.keeper = keeper
        self.store = store
        self.d = d
        self.elsewhere = elsewhere or (lambda node_id: None)

    def begin(self, node_id: str, round_id: int, model_version: int, nonce: Optional[str] = None) -> Receipt:
        """Check the header against the ledger (``nonce``: the header's ``upload_nonce``;
        the gRPC edge always passes it, ``None`` skips the check) and claim the node's row."""
        other = self.elsewhere(node_id)
        if other:
            raise Refusal("wrong_endpoint", other)
        ticket = self.keeper.begin_upload(node_id, round_id, model_version, nonce)
        try:
            slot = self.store.claim(node_id)
        except SealedError:
            self.keeper.abort_upload(ticket, node_id, "stale")
            raise Refusal("stale", f"round {round_id} closed before the upload began") from None
        return Receipt(ticket, node_id, slot, time.monotonic())

    def session(self, receipt: Receipt, header: pb.TensorHeader, num_samples: int) -> UploadSession:
        """An incremental session on the receipt's row (refuses a bad dtype or size at once)."""
        return UploadSession(self, receipt, header, num_samples)

    def receive(self, receipt: Receipt, header: pb.TensorHeader, chunks: Iterable[bytes], num_samples: int,
                client_gone: Callable[[], bool]) -> Upload:
        """Decode the stream's chunks straight into the receipt's row, check it (declared
        size, length, CRC, finiteness) and record it. Any refusal is raised as a
        ``Refusal`` after everything was given back; ``client_gone()`` tells a stream the
        client cut (``broken_stream``: it ends the node's part in the round) from one it
        closed early on purpose."""
        s = self.session(receipt, header, num_samples)
        try:
            for data in chunks:
                s.add(data)
        except Refusal as r:  # (a refusal of the session closed it already; one of ``chunks`` did not)
            s.abort(r.reason)
            raise
        except Exception:  # the stream broke (client died or cancelled): keep nothing
            s.abort("broken_stream")
            raise
        if s.short and client_gone():
            s.abort("broken_stream")
            raise Refusal("broken_stream", "the upload stream broke off")
        return s.finish()

    def abort(self, receipt: Receipt, reason: str) -> None:
        self.store.release(receipt.node_id)
        self.keeper.abort_upload(receipt.ticket, receipt.node_id, reason)
