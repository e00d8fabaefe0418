"""The order-statistics engine under the coordinate-wise rules: sorting networks,
blocked/threaded column maps, and the exact per-row quantile."""
from __future__ import annotations

import itertools

import pytest
import torch

from orchestrator.defenses._order import (RowKthAbs, abs_block_width, column_median, map_column_blocks,
                                          map_sorted_columns, network, row_kth_abs)
from orchestrator.defenses.trimmed_mean import trimmed_mean


def apply(pairs, x):
    x = x.clone()
    for a, b in pairs:
        lo, hi = torch.minimum(x[a], x[b]), torch.maximum(x[a], x[b])
        x[a], x[b] = lo, hi
    return x


@pytest.mark.parametrize("n", range(1, 13))
def test_network_sorts_every_zero_one_input(n):
    # 0-1 principle: a comparator network sorts everything iff it sorts all 0/1 inputs.
    bits = torch.tensor(list(itertools.product((0.0, 1.0), repeat=n))).T
    assert torch.equal(apply(network(n), bits), bits.sort(0).values)


@pytest.mark.parametrize("n", [13, 20, 33, 50, 64, 100])
def test_network_sorts_random_inputs(n):
    x = torch.randn(n, 500, generator=torch.Generator().manual_seed(n))
    assert torch.equal(apply(network(n), x), x.sort(0).values)


@pytest.mark.parametrize("n,need", [(20, (9, 10)), (15, (3, 11)), (7, (0,)), (50, (24, 25))])
def test_pruned_network_gets_the_needed_positions(n, need):
    x = torch.randn(n, 2000, generator=torch.Generator().manual_seed(1))
    pruned = network(n, need)
    assert len(pruned) < len(network(n)) or n < 3
    got, ref = apply(pruned, x), x.sort(0).values
    for i in need:
        assert torch.equal(got[i], ref[i])


@pytest.mark.parametrize("n", [1, 2, 7, 20, 101])
def test_column_median_over_many_blocks_and_threads(n):
    x = torch.randn(n, 100_003, generator=torch.Generator().manual_seed(n))
    s = x.sort(0).values
    assert torch.equal(column_median(x), (s[(n - 1) // 2] + s[n // 2]) * 0.5)


def test_map_sorted_columns_with_rows_scale_and_abs():
    x = torch.randn(9, 70_001, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rows = torch.tensor([0, 2, 3, 5, 8])
    scale = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25], dtype=torch.float64)
    out = torch.empty(5, x.shape[1], dtype=torch.float64)

    def fn(r, cols, ws):
        out[:, cols] = torch.stack(list(r))

    map_sorted_columns(x, fn, rows=rows, scale=scale, absolute=True)
    assert torch.equal(out, (x[rows] * scale[:, None]).abs().sort(0).values)


@pytest.mark.parametrize("k", [0, 1, 6])
def test_trimmed_mean_over_many_blocks(k):
    x = torch.randn(13, 70_001, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[:, :10] = 1.0  # ties
    ref = x.sort(0).values[k:13 - k].mean(0)
    assert torch.allclose(trimmed_mean(x, k), ref, rtol=1e-12, atol=1e-15)


def test_row_kth_abs_is_exact_on_long_rows():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 300_000, generator=g)
    x[1] = 0.0                                       # all ties
    x[2, ::2] = 0.5                                  # half ties at one value
    x[3] *= 1e-30                                    # tiny values
    ref = x.abs().sort(1).values
    for k in (1, 2, 1000, 150_000, 270_000, 299_999, 300_000):
        assert torch.equal(row_kth_abs(x, k), ref[:, k - 1]), k


def test_row_kth_abs_falls_back_when_the_sample_misleads():
    # Make the sampled positions unrepresentative (all huge): the bracket misses,
    # the count check notices, and the exact path answers.
    d = 200_000
    x = torch.rand(2, d, generator=torch.Generator().manual_seed(5))
    x[0, RowKthAbs.sample_positions(d)] = 1e6       # row 0 misleads, row 1 does not
    k = 180_000
    sel = RowKthAbs(x, k)
    for part in map_column_blocks(x, lambda b, ws: sel.observe(b.abs(), ws), abs_block_width(2)):
        sel.absorb(part)
    assert float(sel.lo[0]) == 1e6 and float(sel.lo[1]) < 1.0  # the bracket of row 0 misses
    assert torch.equal(sel.result(), x.abs().sort(1).values[:, k - 1])


@pytest.mark.parametrize("n", [20, 50, 100])
def test_sign_gram_is_exact_in_int8_and_float(n):
    from orchestrator.defenses._geometry import _int_mm_works, blocked_gram, int8_products

    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 50_001, generator=g)
    x[0, ::3] = 0.0                                   # zeros: sign 0, no vote
    s = torch.sign(x).double()
    ref = s @ s.T
    got, _ = blocked_gram(x, lambda b, ws: torch.sign(b))
    assert torch.equal(got, ref)
    if not _int_mm_works():
        pytest.skip("torch._int_mm is not available in this torch build")
    assert int8_products(n, x.device) == (n >= 48)
    got8, _ = blocked_gram(x, lambda b, ws: torch.sign(b, out=ws("sign", *b.shape)).to(torch.int8))
    assert torch.equal(got8, ref)
