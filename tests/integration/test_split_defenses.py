"""Defense work split among aggregation ranks on real gloo process groups.

Every registered defense and option combination (``CONFIGS`` of the contract
tests, every Layerwise Cosine variant among them, plus layerwise wrappers
around stateful rules) runs at W = 2 and W = 3 ranks (``DistShards``, every
vector split: ``min_columns = 1``) on the same uploads as at one rank, and must
give the one-rank delta and accepted mask on every rank, and the same state.

Uploads: the test model's layout (a 3-value layer, buffers; every layer
smaller than some spans), an uneven layout whose d divides by neither 2 nor 3
and a 100K-column float32 layout with a common part (both with, in round 1,
a row holding NaN and one holding 1e30) (the centred float32 Gram path on
every span, FedSECA's blocks and quantile bracket split). Stateful rules run
three rounds, state carried. Each world is spawned once; the ranks loop over
every case and write their results to files compared in the parent.

Tolerances (``tolerance``): bit-for-bit where each value is computed by the
same code on the same numbers as at one rank (coordinate-wise rules, rules run
on every rank, layers run whole on one rank, a selected row or a mean of
selected rows when the selection is the same); relative ``GRAM_RTOL`` where a
result depends continuously on Gram sums taken in another order (median
clipping's radius and scales, RFA's and centered clipping's Weiszfeld-type
weights).
"""
from __future__ import annotations

import datetime
import functools
import os
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.defenses import DefenseError, RoundContext, build_defense
from orchestrator.defenses._split import sequential
from orchestrator.defenses.base import LOCAL, Shards
from proto.layout import Layout
from tests.unit.defenses.helpers import LAYOUT, GLOBAL, model_fn
from tests.unit.defenses.test_contract import CONFIGS

EXTRA = [("layerwise", {"inner": "stpa"}), ("layerwise", {"inner": {"name": "fedseca", "momentum": True}}),
         ("nnm", {"inner": "stpa"}), ("layerwise", {"inner": "bucketing"}),
         ("layerwise", {"inner": {"name": "krum", "distance": "cosine", "clip": "median"}})]
ALL = CONFIGS + EXTRA
N, F, ROUNDS = 15, 3, 3
GRAM_RTOL = 1e-5

UNEVEN = Layout.from_shapes([("conv", (37, 53)), ("conv.b", (37,)), ("fc", (13, 211)), ("bn.mean", (13,)),
                             ("bn.var", (13,)), ("head", (5, 97)), ("head.b", (5,))],
                            buffers=frozenset({"bn.mean", "bn.var"}))
LARGE = Layout.from_shapes([("w1", (257, 383)), ("b1", (258,)), ("w2", (31, 113)), ("bn", (31,))],
                           buffers=frozenset({"bn"}))
LAYOUTS = {"tiny": LAYOUT, "uneven": UNEVEN, "large": LARGE, "broken": UNEVEN}
# Layer "fc" all NaN: a layerwise rule fails on that layer only, on the rank
# that owns it, and every rank must raise the one-rank error (not hang).
BROKEN = [("krum", {"layerwise": True}), ("layerwise", {}), ("layerwise", {"inner": "rfa"}),
          ("bulyan", {"layerwise": True, "distance": "cosine", "clip": "median"})]
assert UNEVEN.d % 2 and UNEVEN.d % 3 and LARGE.d % 2 and LARGE.d % 3 and LARGE.d > 3 << 15
# Off the uneven layout (time) the distance rules run in these variants only.
LARGE_DISTANCE = [{}, {"clip": "median"}, {"distance": "cosine", "clip": "median"},
                  {"layerwise": True, "distance": "cosine", "clip": "median"}]
DISTANCE_RULES = {"krum", "multikrum", "geomed", "bulyan"}
_DEFAULTS = (None, False, "euclidean", "iterative", "closest-to-median")


def _id(cfg: tuple[str, dict]) -> str:
    name, params = cfg
    return name + "".join(f"-{k}={v}" for k, v in params.items() if v not in (None, False))


@functools.lru_cache(maxsize=None)
def _uploads(key: str, rnd: int) -> torch.Tensor:
    """Round ``rnd``'s ``[N, d]`` float32 uploads on layout ``key`` (rules never write to their input)."""
    layout = LAYOUTS[key]
    g = torch.Generator().manual_seed(100 * rnd + len(key))
    d = layout.d
    common = 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
    # A common part large enough that every span's frame is centred, small enough
    # that float32 cosines (uncentred, as at one rank) still tell rows apart.
    scale = 3.0 if key == "large" else 1.0
    x = scale * common + 0.05 * torch.randn(N, d, generator=g, dtype=torch.float64)
    bad = torch.randn(F, d, generator=g, dtype=torch.float64)
    x[:F] = x[F:].mean(0) + 30.0 * bad / bad.norm(dim=1, keepdim=True) * (0.05 * d ** 0.5)
    x = x.to(torch.float32)
    if key == "broken":
        x[:, layout.layers[2].slice] = float("nan")
    if key in ("uneven", "large") and rnd == 1:
        x[1, 7] = float("nan")
        x[2] *= 1e30 / float(x[2].abs().max())
    return x


def _cases() -> list[tuple[str, str, dict, int]]:
    """``(layout key, config id, ...)`` cases in a fixed order (the ranks' collectives follow it)."""
    out = []
    for key in LAYOUTS:
        for name, params in (BROKEN if key == "broken" else ALL):
            if name == "vdc" and key != "tiny":
                continue  # vdc runs the test model: its layout only
            # Every variant runs on the uneven layout; elsewhere (time) the
            # distance rules run in the LARGE_DISTANCE variants only.
            few = name in DISTANCE_RULES and \
                {k: v for k, v in params.items() if v not in _DEFAULTS} not in LARGE_DISTANCE
            if few and key != "uneven":
                continue
            if sequential(build_defense(name, params)):
                rounds = list(range(ROUNDS))  # state (or the generator) carried over rounds
            elif key in ("tiny", "broken") or few:
                rounds = [0]
            else:
                rounds = [0, 1]  # round 1: a row holding NaN, one holding 1e30
            out.append((key, name, params, rounds))
    return out


def _flat_state(state: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(state, dict):
        for k in sorted(state):
            out.update(_flat_state(state[k], f"{prefix}/{k}"))
    else:
        out[prefix] = state.clone() if isinstance(state, torch.Tensor) else state
    return out


def run_cases(shards: Shards) -> dict[tuple, dict[str, Any]]:
    """Every case on these shards: ``{(layout, config id, round): result}``."""
    results = {}
    for key, name, params, rounds in _cases():
        layout = LAYOUTS[key]
        rule = build_defense(name, params)
        state: dict = {}
        gw = GLOBAL.to(torch.float32) if key == "tiny" else torch.zeros(layout.d)
        for rnd in rounds:
            x = _uploads(key, rnd)
            ctx = RoundContext(layout=layout, global_weights=gw, round=rnd, f=F,
                               generator=torch.Generator().manual_seed(1000 + rnd), state=state,
                               model_fn=model_fn, sample_counts=torch.arange(1, N + 1, dtype=torch.float32) * 10,
                               shards=shards)
            try:
                res = rule(x, ctx)
                out = {"delta": res.delta.clone(), "accepted": res.accepted.clone(), "state": _flat_state(state)}
            except DefenseError as exc:
                out = {"error": str(exc)}
            results[(key, _id((name, params)), rnd)] = out
    return results


def _rank(rank: int, world: int, port: int, out_dir: str) -> None:
    from orchestrator.shards import DistShards

    torch.set_num_threads(1)
    # A rank left waiting in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        shards = DistShards(min_columns=1)
        # The collectives themselves: equal spans (gathered straight into the output) and unequal ones.
        plumbing = {}
        for d in (12, 13):
            a, b = shards.span(d)
            plumbing[d] = shards.gather_columns(torch.arange(a, b, dtype=torch.float32), d, out=torch.empty(d))
        plumbing["sum"] = shards.all_reduce_sum(torch.full((2, 2), float(rank + 1), dtype=torch.float64))
        plumbing["mask"] = shards.gather(torch.tensor([rank % 2 == 0]), [1] * world)
        torch.save({"plumbing": plumbing, "cases": run_cases(shards)}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(spec: Any) -> tuple[str, dict]:
    return (spec, {}) if isinstance(spec, str) else (spec["name"], {k: v for k, v in spec.items() if k != "name"})


def tolerance(name: str, params: dict) -> float:
    """Relative tolerance of a configuration (0: bit-for-bit), see the module docstring."""
    if name == "layerwise":
        # Layers run whole on one rank, unless the inner rule is sequential (then split as it splits).
        inner = _spec(params.get("inner", "median"))
        return tolerance(*inner) if sequential(build_defense(*inner)) else 0.0
    if params.get("layerwise"):
        return 0.0
    if name in ("rfa", "centered_clipping"):
        return GRAM_RTOL  # weights from iterations over the summed Gram matrix
    if name in DISTANCE_RULES:
        # A selection is bit-for-bit; median clipping's radius and scales are not.
        return GRAM_RTOL if params.get("clip") else 0.0
    if "inner" in params:
        return tolerance(*_spec(params["inner"]))
    return 0.0


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    if rtol == 0.0:
        return torch.equal(a, b)
    scale = float(b.abs().max()) if b.numel() else 0.0
    return torch.allclose(a, b, rtol=rtol, atol=rtol * scale, equal_nan=True)


def _same(a: dict, b: dict, rtol: float) -> str | None:
    """Why result ``a`` differs from ``b`` (None when it does not)."""
    if "error" in a or "error" in b:
        return None if a.get("error") == b.get("error") else f"error {a.get('error')!r} vs {b.get('error')!r}"
    if not torch.equal(a["accepted"], b["accepted"]):
        return f"accepted {a['accepted'].tolist()} vs {b['accepted'].tolist()}"
    if not _close(a["delta"], b["delta"], rtol):
        return f"delta differs by {float((a['delta'] - b['delta']).abs().max()):.3g} (rtol {rtol})"
    if a["state"].keys() != b["state"].keys():
        return f"state keys {sorted(a['state'])} vs {sorted(b['state'])}"
    for k, v in a["state"].items():
        w = b["state"][k]
        ok = _close(v, w, rtol) if isinstance(v, torch.Tensor) else (v == w or rtol > 0)
        if not ok:
            return f"state {k} differs"
    return None


@pytest.fixture(scope="module")
def one_rank() -> dict:
    torch.set_num_threads(1)
    try:
        return run_cases(LOCAL)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


@pytest.mark.parametrize("world", [2, 3])
def test_split_defenses_equal_one_rank(world, tmp_path, one_rank):
    mp.start_processes(_rank, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True,
                       start_method="spawn")
    saved = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(world)]
    for got in saved:
        plumbing = got["plumbing"]
        assert torch.equal(plumbing[12], torch.arange(12.0)) and torch.equal(plumbing[13], torch.arange(13.0))
        assert torch.equal(plumbing["sum"], torch.full((2, 2), world * (world + 1) / 2, dtype=torch.float64))
        assert plumbing["mask"].tolist() == [r % 2 == 0 for r in range(world)]
    ranks = [got["cases"] for got in saved]
    assert all(r.keys() == one_rank.keys() for r in ranks)
    failures = []
    specs = {_id(cfg): cfg for cfg in ALL + BROKEN}
    for case, ref in one_rank.items():
        key, cfg_id, rnd = case
        rtol = tolerance(*specs[cfg_id])
        for r, got in enumerate(ranks):
            # Every rank the same (bit for bit), and the one-rank result (within tolerance).
            why = _same(got[case], ranks[0][case], 0.0) if r else _same(got[case], ref, rtol)
            if why:
                failures.append(f"W={world} rank {r} {key} {cfg_id} round {rnd}: {why}")
    errors = sum("error" in v for k, v in one_rank.items() if k[0] != "broken")
    assert errors < len(one_rank) // 4, f"{errors} of {len(one_rank)} cases raised"
    assert all("error" in v for k, v in one_rank.items() if k[0] == "broken")
    assert not failures, "\n".join(failures[:40]) + f"\n({len(failures)} in all)"
