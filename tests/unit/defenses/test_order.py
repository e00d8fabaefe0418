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


# --- The two CPU kernels (_order.kernel): Batcher network and numpy's sort ---

def _hard_columns(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    x[:, :7] = 1.0                                  # all ties
    x[::2, 7:20] = -0.5                             # half ties
    x[0, 20], x[-1, 21] = float("inf"), float("-inf")
    x[:, 22] = float("inf")
    x[0, 23] = x[-1, 23] = 3e38 if dtype == torch.float32 else 1e300   # huge finite
    return x


@pytest.mark.parametrize("n", [3, 24, 64, 100])
def test_both_kernels_give_every_exact_order_statistic(n):
    x = _hard_columns(n, 9_001, n)
    ref = x.sort(0).values
    for use in ("network", "sort"):
        out = torch.empty_like(x)

        def fn(r, cols, ws):
            out[:, cols] = torch.stack(list(r))

        map_sorted_columns(x, fn, use=use)
        assert torch.equal(out, ref), use
        lo, hi = (n - 1) // 2, n // 2
        assert torch.equal(column_median(x, use=use), ref[lo] * 0.5 + ref[hi] * 0.5), use


def test_sort_kernel_with_rows_scale_and_abs():
    x = _hard_columns(40, 20_001, 7, torch.float64)
    rows = torch.tensor([0, 2, 3, 5, 8, 13, 21, 34, 39])
    scale = torch.linspace(0.25, 2.0, rows.numel(), dtype=torch.float64)
    ref = (x[rows] * scale[:, None]).abs().sort(0).values
    out = torch.empty_like(ref)

    def fn(r, cols, ws):
        out[:, cols] = torch.stack(list(r))

    map_sorted_columns(x, fn, rows=rows, scale=scale, absolute=True, use="sort")
    assert torch.equal(out, ref)
    assert torch.equal(column_median(x, rows=rows, scale=scale, absolute=True, use="sort"), ref[4])


@pytest.mark.parametrize("use", ["network", "sort"])
@pytest.mark.parametrize("n,k", [(24, 7), (64, 19), (101, 30)])
def test_trimmed_mean_kernels_match_the_sorted_reference(use, n, k):
    x = _hard_columns(n, 30_001, n, torch.float64)
    x[:, 23] = 0.0                                  # (1e300 sums overflow in neither kernel, but the clamp trick
    ref = x.sort(0).values[k:n - k].mean(0)         # cancels inf - inf at column 22: compare elsewhere)
    got = trimmed_mean(x, k, use)
    keep = torch.ones(x.shape[1], dtype=torch.bool)
    keep[22] = False
    assert torch.allclose(got[keep], ref[keep], rtol=1e-12, atol=1e-15)
    if use == "sort":
        assert got[22] == float("inf")


@pytest.mark.parametrize("use", ["network", "sort"])
def test_a_column_holding_nan_is_nan_in_either_kernel(use):
    n = 30
    x = torch.randn(n, 5_000, generator=torch.Generator().manual_seed(5))
    x[3, 100] = float("nan")
    x[:, 101] = float("nan")
    med, tm = column_median(x, use=use), trimmed_mean(x, 5, use)
    for v in (med, tm):
        assert v[100].isnan() and v[101].isnan()
        assert int(v.isnan().sum()) == 2
    got = {}

    def fn(r, cols, ws):
        got[cols.start] = torch.stack([r[0], r[n - 1]])

    map_sorted_columns(x, fn, need=(0, n - 1), use=use)
    both = torch.cat([got[c] for c in sorted(got)], 1)
    assert both[:, 100].isnan().all() and both[:, 101].isnan().all()


@pytest.mark.parametrize("n,k", [(64, 19), (100, 30)])
def test_sort_kernel_results_depend_on_each_column_only(n, k):
    # Aggregation ranks split columns on block multiples, but with the sort
    # kernel a column's bits do not even depend on which block holds it: any
    # span of columns, at any offset, gives the full matrix's bits there.
    x = torch.randn(n, 40_000, generator=torch.Generator().manual_seed(n)).mul_(1e-3)
    med, tm = column_median(x, use="sort"), trimmed_mean(x, k, use="sort")
    for a, b in [(0, 1), (1, 3), (777, 5_000), (4_095, 4_097), (12_345, 40_000)]:
        part = x[:, a:b].contiguous()
        assert torch.equal(column_median(part, use="sort"), med[a:b])
        assert torch.equal(trimmed_mean(part, k, use="sort"), tm[a:b])


def test_kernel_table_picks_by_n_and_positions():
    from orchestrator.defenses._order import SORT_FROM, kernel, sorted_block_width, _sort_block

    m = SORT_FROM["median"]
    assert kernel(m - 1, ((m - 2) // 2, (m - 1) // 2)) == "network"
    assert kernel(m, ((m - 1) // 2, m // 2)) == "sort"
    p = SORT_FROM["pair"]
    assert kernel(p - 1, (1, p - 3)) == "network" and kernel(p, (1, p - 2)) == "sort"
    a = SORT_FROM["all"]
    assert kernel(a - 1, None) == "network" and kernel(a, None) == "sort"
    for n in range(1, 300):
        # The split alignment covers both kernels' blocks.
        assert sorted_block_width(n) % _sort_block(n) == 0


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "fedseca", "bulyan"])
@pytest.mark.parametrize("kind", ["nan-row", "nan-entry", "inf-entry", "row3e38", "row-max"])
def test_rules_on_the_sort_kernel_keep_their_robustness(name, kind):
    # n = 100: the median, trimmed mean and FedSECA's median run on numpy's sort
    # (the robustness tests' small n run the networks); bad values in row 0.
    from orchestrator.defenses import build_defense
    from proto.layout import Layout

    from tests.unit.defenses.helpers import context, honest

    n, d = 100, 3_000
    good, mu = honest(n, d, seed=11, dtype=torch.float32)
    x = good.clone()
    if kind == "nan-row":
        x[0] = float("nan")
    elif kind == "nan-entry":
        x[0, 5] = float("nan")
    elif kind == "inf-entry":
        x[0, 5] = float("inf")
    elif kind == "row3e38":
        x[0] = 3e38
    else:
        x[0] = torch.finfo(torch.float32).max * torch.where(torch.arange(d) % 2 == 0, 1.0, -1.0)
    f = 24 if name == "bulyan" else 30
    res = build_defense(name, {})(x, context(f=f, layout=Layout.from_shapes([("w", (d,))]), dtype=torch.float32))
    assert torch.isfinite(res.delta).all()
    if kind.startswith("nan"):
        assert not res.accepted[0]
    spread = float((good[1:].double() - good[1:].double().mean(0)).norm(dim=1).max())
    if name == "fedseca":   # sparsified (top 10% per row): only its scale is comparable
        assert float(res.delta.double().norm()) < 10 * spread
    else:
        assert float((res.delta.double() - mu.double()).norm()) < 10 * spread
    if name in ("median", "trimmed_mean") and not kind.startswith("nan"):
        # The exact order statistics of every column, bad row included.
        s = x.double().sort(0).values
        ref = (s[49] + s[50]) / 2 if name == "median" else s[f:n - f].mean(0)
        assert torch.allclose(res.delta.double(), ref, rtol=1e-5, atol=1e-6)


def test_an_unknown_kernel_is_a_precise_error():
    x = torch.randn(5, 10)
    for call in (lambda: column_median(x, use="bitonic"), lambda: trimmed_mean(x, 1, use="bitonic"),
                 lambda: map_sorted_columns(x, lambda r, c, w: None, use="bitonic")):
        with pytest.raises(ValueError, match="'network' or 'sort'"):
            call()
