"""The aggregation ranks' security parts (``orchestrator/ranksec.py``): sealed frames
(round trip, tamper, wrong key, replay, reorder), join proofs, and the group secret's
sources (environment, 0600 file)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator import ranksec
from orchestrator.ranksec import (CHUNK, HEADER, TAG, GroupKeyError, GroupSecret, SealError, byte_view, group_key_from,
                                  new_group_key, read_group_key_file, sealed_size, write_group_key_file)

CHAL = b"c" * 32


def _pair(secret: GroupSecret = None, generation: int = 0):
    secret = secret or GroupSecret(new_group_key())
    return secret.sealer(generation, CHAL, 0), secret.sealer(generation, CHAL, 1)


@pytest.mark.parametrize("nbytes", [0, 1, 1000, 3 * 4 * 257])
def test_round_trip(nbytes):
    a, b = _pair()
    data = np.frombuffer(os.urandom(nbytes), dtype=np.uint8)
    frame = a.seal(data, 7, b"G")
    assert frame.size == sealed_size(nbytes) == HEADER + nbytes + TAG
    if nbytes >= 16:  # the payload does not appear in the frame
        assert data[:16].tobytes() not in frame.tobytes()
    assert np.array_equal(b.open(frame, 0, 7, b"G", nbytes), data)


def test_round_trip_of_a_tensor_over_several_chunks(monkeypatch):
    monkeypatch.setattr(ranksec, "CHUNK", 1000)
    a, b = _pair()
    x = torch.randn(5, 333)  # 6660 bytes: 7 chunks of 1000
    frame = a.seal(byte_view(x), 3, b"B")
    assert frame.size == HEADER + x.numel() * 4 + 7 * TAG
    out = torch.empty_like(x)
    b.open(frame, 0, 3, b"B", x.numel() * 4, out=byte_view(out))
    assert torch.equal(out, x)  # bit for bit
    assert CHUNK == 64 << 20


def test_a_flipped_bit_anywhere_is_refused():
    a, b = _pair()
    data = np.arange(200, dtype=np.uint8)
    frame = a.seal(data, 1, b"G")
    for pos in (HEADER + 5, frame.size - 1):  # payload, tag
        bad = frame.copy()
        bad[pos] ^= 1
        with pytest.raises(SealError, match="does not authenticate"):
            b.open(bad, 0, 1, b"G", 200)
    bad = frame.copy()
    bad[6] ^= 1  # the header's generation
    with pytest.raises(SealError, match="replayed, reordered or misdirected"):
        b.open(bad, 0, 1, b"G", 200)
    with pytest.raises(SealError, match="bytes, expected"):  # truncated
        b.open(frame[:-1], 0, 1, b"G", 200)
    with pytest.raises(SealError, match="not a sealed frame"):
        b.open(np.zeros(frame.size, dtype=np.uint8), 0, 1, b"G", 200)


def test_another_group_key_does_not_open():
    a, _ = _pair()
    _, stranger = _pair()
    frame = a.seal(np.arange(64, dtype=np.uint8), 1, b"G")
    with pytest.raises(SealError, match="another group key"):
        stranger.open(frame, 0, 1, b"G", 64)


def test_another_generation_or_challenge_does_not_open():
    secret = GroupSecret(new_group_key())
    a = secret.sealer(2, CHAL, 0)
    frame = a.seal(np.arange(64, dtype=np.uint8), 1, b"G")
    assert np.array_equal(secret.sealer(2, CHAL, 1).open(frame, 0, 1, b"G", 64), np.arange(64, dtype=np.uint8))
    with pytest.raises(SealError):  # generation 3 reads generation 2's frame as misdirected
        secret.sealer(3, CHAL, 1).open(frame, 0, 1, b"G", 64)
    with pytest.raises(SealError, match="does not authenticate"):  # same generation, another challenge: another key
        secret.sealer(2, b"d" * 32, 1).open(frame, 0, 1, b"G", 64)


def test_a_replayed_or_misattributed_frame_is_refused():
    a, b = _pair()
    old = a.seal(np.arange(64, dtype=np.uint8), 4, b"G")
    with pytest.raises(SealError, match=r"generation 0, op 4: replayed"):
        b.open(old, 0, 5, b"G", 64)  # op 4's frame offered as op 5's
    with pytest.raises(SealError, match="replayed, reordered or misdirected"):
        b.open(old, 1, 4, b"G", 64)  # as another sender's
    with pytest.raises(SealError, match="replayed, reordered or misdirected"):
        b.open(old, 0, 4, b"B", 64)  # as another kind of collective
    # a replay whose header is rewritten to the expected op fails the tag (the nonce moved)
    forged = old.copy()
    forged[:HEADER] = a.seal(np.arange(64, dtype=np.uint8), 5, b"G")[:HEADER]
    with pytest.raises(SealError, match="does not authenticate"):
        b.open(forged, 0, 5, b"G", 64)


def test_op_numbers_count_up_and_nonces_never_repeat():
    a, _ = _pair()
    ops = [a.next_op() for _ in range(5)]
    assert ops == [1, 2, 3, 4, 5]
    data = np.zeros(32, dtype=np.uint8)
    frames = {a.seal(data, op, b"G").tobytes() for op in ops}
    assert len(frames) == 5  # the same payload seals differently at every op


def test_join_proofs():
    secret = GroupSecret(new_group_key())
    nonce = os.urandom(16)
    tag = secret.proof(0, 1, CHAL, nonce)
    assert secret.check_proof(0, 1, CHAL, nonce, tag)
    assert not secret.check_proof(1, 1, CHAL, nonce, tag)  # another generation
    assert not secret.check_proof(0, 2, CHAL, nonce, tag)  # another rank
    assert not secret.check_proof(0, 1, b"d" * 32, nonce, tag)  # another challenge
    assert not GroupSecret(new_group_key()).check_proof(0, 1, CHAL, nonce, tag)  # another key
    assert secret.prefix(0, CHAL) != secret.prefix(1, CHAL) != GroupSecret(new_group_key()).prefix(1, CHAL)
    assert "<hidden>" in repr(secret)


def test_group_key_sources(tmp_path):
    key = new_group_key()
    assert group_key_from(env={}) is None
    assert group_key_from(env={"BYZFED_GROUP_KEY": key.hex()}) == key
    with pytest.raises(GroupKeyError, match=r"\$BYZFED_GROUP_KEY must hold 64 hex digits"):
        group_key_from(env={"BYZFED_GROUP_KEY": "abc"})
    path = write_group_key_file(tmp_path / "group.key", key)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert read_group_key_file(path) == key
    assert group_key_from(str(path), env={}) == key
    assert group_key_from(env={"BYZFED_GROUP_KEY_FILE": str(path)}) == key
    path.chmod(0o644)
    with pytest.raises(GroupKeyError, match="readable by others"):
        read_group_key_file(path)
    with pytest.raises(GroupKeyError, match="No such file"):
        read_group_key_file(tmp_path / "missing.key")


def test_a_rank_without_a_usable_group_key_does_not_join(tmp_path, monkeypatch, caplog):
    from orchestrator import group, rank
    from tests.integration.harness import scenario

    monkeypatch.delenv("BYZFED_GROUP_KEY", raising=False)
    monkeypatch.delenv("BYZFED_GROUP_KEY_FILE", raising=False)
    with pytest.raises(group.GroupError, match=r"rank 1: no group key: .*BYZFED_GROUP_KEY.*--group-key-file"):
        group.group_secret(group.GroupSpec(1, 2, "tcp://127.0.0.1:1"))
    bad = tmp_path / "group.key"
    bad.write_text("not hex\n")
    bad.chmod(0o600)
    s = scenario(aggregation={"ranks": 2})
    caplog.set_level("ERROR", logger="orchestrator.group")
    assert rank.follow(s, tmp_path, 1, 2, "tcp://127.0.0.1:1", group_key_file=str(bad)) == 1
    assert f"group key file {bad} must hold 64 hex digits" in caplog.text


def test_rank_encryption_follows_tls_or_its_own_setting():
    from orchestrator.group import rank_encryption
    from tests.integration.harness import scenario

    assert not rank_encryption(scenario())
    assert rank_encryption(scenario(security={"rank_encryption": True}))
    assert rank_encryption(scenario(security={"tls": True}))


def test_an_mpirun_job_finds_its_group_key(tmp_path, monkeypatch):
    from orchestrator import mpi

    monkeypatch.delenv("BYZFED_GROUP_KEY", raising=False)
    monkeypatch.delenv("BYZFED_GROUP_KEY_FILE", raising=False)
    path = mpi._group_key_file(tmp_path / "run")  # rank 0, no key in the environment: RUN_DIR/group.key
    assert path == str(tmp_path / "run" / "group.key") and (Path(path).stat().st_mode & 0o777) == 0o600
    key, problem = mpi._group_key({"group_key_file": path}, True)
    assert len(key) == 32 and problem == "" and key == read_group_key_file(Path(path))
    assert mpi._group_key({"group_key_file": path}, False) == (b"", "")  # node hosts hold none
    # rank 0's environment had it, this rank's has not (mpirun without -x)
    key, problem = mpi._group_key({"group_key_file": ""}, True)
    assert key == b"" and "pass mpirun -x BYZFED_GROUP_KEY" in problem
    monkeypatch.setenv("BYZFED_GROUP_KEY", new_group_key().hex())
    assert mpi._group_key_file(tmp_path / "other") == "" and not (tmp_path / "other").exists()
    key, problem = mpi._group_key({"group_key_file": ""}, True)
    assert key == bytes.fromhex(os.environ["BYZFED_GROUP_KEY"]) and problem == ""
