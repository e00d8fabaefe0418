"""The split-work seam (``RoundContext.shards``): spans, layer owners, and the
one-rank case, which must be the plain one-rank code (no collective, the same
results as a context built without shards). The multi-rank equality is
``tests/integration/test_split_defenses.py`` (real gloo groups)."""
from __future__ import annotations

import pytest
import torch

from orchestrator.defenses import RoundContext, build_defense
from orchestrator.defenses._split import sequential
from orchestrator.defenses.base import LOCAL, Shards
from tests.unit.defenses.helpers import LAYOUT, context, honest, with_outliers
from tests.unit.defenses.test_contract import CONFIGS, _id


class _Ranks(Shards):
    """Rank ``rank`` of ``world_size`` with no way to talk: for the span arithmetic."""

    def __init__(self, rank: int, world_size: int, min_columns: int = 0) -> None:
        self.rank, self.world_size, self.min_columns = rank, world_size, min_columns


class _NoTalk(Shards):
    """One rank whose collectives fail: the one-rank path must not call them."""

    def all_reduce_sum(self, t):
        raise AssertionError("a collective at one rank")

    def gather(self, part, sizes):
        raise AssertionError("a collective at one rank")

    def gather_columns(self, block, d, align=1, out=None):
        raise AssertionError("a collective at one rank")


def test_context_defaults_to_local():
    ctx = RoundContext(layout=LAYOUT, global_weights=torch.zeros(LAYOUT.d))
    assert ctx.shards is LOCAL and LOCAL.world_size == 1 and LOCAL.rank == 0
    t = torch.randn(3, 4)
    row = t[0]
    assert LOCAL.all_reduce_sum(t) is t and LOCAL.gather(t, [3]) is t and LOCAL.gather_columns(row, 4) is row
    assert LOCAL.span(10) == (0, 10) and LOCAL.owners([5, 1, 7]) == [0, 0, 0] and LOCAL.for_columns(10) is LOCAL


@pytest.mark.parametrize("d,world,align", [(10, 2, 1), (11, 3, 1), (7, 3, 1), (100_003, 3, 4096), (65_536, 2, 32_768)])
def test_spans_are_balanced_contiguous_and_aligned(d, world, align):
    spans = [_Ranks(r, world).span(d, align) for r in range(world)]
    assert spans[0][0] == 0 and spans[-1][1] == d
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(stop > start for start, stop in spans)
    assert all(start % align == 0 for start, _ in spans)
    sizes = [stop - start for start, stop in spans]
    assert max(sizes) - min(sizes) <= align


def test_too_few_columns_are_not_split():
    assert _Ranks(0, 3).for_columns(2) is LOCAL           # fewer columns than ranks (gloo: no empty parts)
    assert _Ranks(0, 2).for_columns(5000, align=4096) is LOCAL
    assert _Ranks(0, 2, min_columns=1 << 15).for_columns(1000) is LOCAL
    sh = _Ranks(1, 2)
    assert sh.for_columns(8192, align=4096) is sh


def test_layer_owners_are_balanced_and_deterministic():
    sizes = [9408, 64, 36864, 36864, 64, 73728, 147456, 8192, 128, 5130]
    owners = _Ranks(0, 2).owners(sizes)
    assert owners == _Ranks(1, 2).owners(sizes)
    load = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert max(load) - min(load) <= max(sizes)
    assert set(_Ranks(0, 3).owners(sizes)) == {0, 1, 2}


def test_sequential_rules_are_marked():
    assert sequential(build_defense("stpa", {})) and sequential(build_defense("bucketing", {}))
    assert sequential(build_defense("fedseca", {"momentum": True})) and not sequential(build_defense("fedseca", {}))
    assert sequential(build_defense("centered_clipping", {}))
    assert not sequential(build_defense("centered_clipping", {"start": "zero"}))
    assert sequential(build_defense("nnm", {"inner": "stpa"})) and not sequential(build_defense("krum", {}))
    assert sequential(build_defense("layerwise", {"inner": "vdc"}))


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_one_rank_is_the_plain_code(cfg):
    name, params = cfg
    x = with_outliers(honest(15, LAYOUT.d, dtype=torch.float32)[0], 3, norm=10.0)
    results = []
    for shards in (None, _NoTalk()):
        ctx = context(dtype=torch.float32, n=15)
        if shards is not None:
            ctx.shards = shards
        results.append(build_defense(name, params)(x, ctx))
    assert torch.equal(results[0].delta, results[1].delta)
    assert torch.equal(results[0].accepted, results[1].accepted)
