"""Per-coordinate order statistics of an ``[n, d]`` matrix, fast on CPU.

Coordinate-wise rules (median, trimmed mean, Bulyan's reduction, FedSECA's
clamp) need, for every column, a few order statistics of ``n <= a few hundred``
values. ``torch.sort`` / ``torch.median`` along ``dim=0`` treat each column as a
separate tiny sort and run at ~200 ns per column on CPU, 70x the cost of a mean.
Here the columns are sorted *together*: a Batcher odd-even merge sorting network
is a fixed list of compare-exchange pairs ``(a, b)``, and each pair becomes two
vectorised ops (``minimum``/``maximum``) over a whole block of columns. Blocks of
columns sized to stay in cache are processed by a small thread pool (the ops
release the GIL). The network is pruned to the output positions the caller needs.
From a few dozen rows on, numpy's AVX-512 sort of each column (the block
transposed to one row per column, :func:`map_sorted_blocks`) is faster; which
kernel runs is a fixed table by ``n`` (:func:`kernel`).

On CUDA the blocks are sorted with ``torch.sort`` (fast there); the maths the
callers do on the sorted rows is the same on both paths.
"""
from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import torch

from .base import LOCAL, Shards


class Scratch:
    """Reusable temporaries of one worker thread for one blocked pass.

    ``ws(name, rows, cols)`` is a contiguous ``[rows, cols]`` tensor that stays
    the same memory for every block the thread handles (the last block may be
    narrower: it gets the front of the buffer). Fresh block-sized temporaries
    would each be a new mapping when glibc's mmap threshold is pinned, as the
    orchestrator does for its update buffers (:func:`orchestrator.coordinator.steady_heap`),
    and page faults then cost more than the arithmetic: FedSECA ran 2.6x slower.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def __call__(self, name: str, rows: int, cols: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dt = self.dtype if dtype is None else dtype
        need = rows * cols
        buf = self._bufs.get((name, dt))
        if buf is None or buf.numel() < need:
            buf = torch.empty(need, dtype=dt, device=self.device)
            self._bufs[(name, dt)] = buf
        return buf[:need].view(rows, cols)


RowsFn = Callable[[Sequence[torch.Tensor], slice, Scratch], None]


@functools.lru_cache(maxsize=256)
def network(n: int, need: Optional[tuple[int, ...]] = None) -> tuple[tuple[int, int], ...]:
    """Compare-exchange pairs of Batcher's odd-even merge sort on ``n`` wires.

    After applying the pairs in order (low value to ``a``, high to ``b``), wire ``i``
    holds the ``i``-th smallest input. With ``need`` only the pairs that can affect
    those output wires are kept (backward cone of the network).
    """
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            j = k % p
            while j + k < n:
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
                j += 2 * k
            k //= 2
        p *= 2
    if need is None:
        return tuple(pairs)
    live, kept = set(need), []
    for a, b in reversed(pairs):
        if a in live or b in live:
            kept.append((a, b))
            live.update((a, b))
    return tuple(reversed(kept))


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1, 16))


# Which kernel sorts a block of columns on CPU, by the number of rows n sorted
# per column: the Batcher network below ``SORT_FROM[kind]`` rows, numpy's sort
# at and above. Measured once (BENCHMARKS.md, "Coordinate-wise rules at large
# n": one thread, process CPU time, d = 1M, ``bench/order_kernels.py``).
# "median": one position or two adjacent ones (the network pruned to them is
# the cheapest), "pair": two positions apart (the trimmed mean's cut points),
# "all": more (Bulyan's reductions).
SORT_FROM = {"median": 64, "pair": 24, "all": 80}


def kernel(n: int, need: Optional[tuple[int, ...]]) -> str:
    """``"network"`` or ``"sort"``: the CPU kernel of :func:`map_sorted_columns`
    for ``n`` rows and the needed positions (see ``SORT_FROM``)."""
    pos = None if need is None else sorted(set(need))
    if pos is not None and not pos:
        raise ValueError("need: at least one position")
    kind = "all" if pos is None or len(pos) > 2 else "median" if pos[-1] - pos[0] <= 1 else "pair"
    return "sort" if n >= SORT_FROM[kind] else "network"


def _block(k: int) -> int:
    # ~k * block * 4 bytes of working set: keep the k rows of one block within
    # a core's L2/L3 share while each op stays large enough to hide dispatch.
    # A multiple of the sort kernel's block (see sorted_block_width).
    sort = _sort_block(k)
    return max(4096, min(32768, (1 << 21) // max(k, 1) // sort * sort))


def _sort_block(k: int) -> int:
    # Numpy's sort path: a contiguous copy of the block's k rows, its transpose
    # and the sorted values (~3 x k x block x 4 bytes) stay in a core's L2.
    return max(1024, min(16384, 1 << int(math.log2(max(1, (1 << 19) // max(k, 1))))))


def sorted_block_width(k: int) -> int:
    """Columns per block of :func:`map_sorted_columns` on ``k`` rows (CPU). Column
    spans split among aggregation ranks on multiples of it give each rank blocks
    of one rank's pass, so reductions inside a block (whose order may depend on
    the block's width) give one rank's bits. (It is the network's block, a
    multiple of the sort kernel's, so it aligns either kernel's blocks.)"""
    return _block(k)


def chunk_width(k: int, device: torch.device) -> int:
    """Columns per chunk for the work a :func:`map_sorted_columns` callback does
    on ``k`` rows of its block beyond reading the sorted rows (CPU; elsewhere no
    chunking): about 1 MiB per ``[k, chunk]`` temporary. Block-wide temporaries of
    ``k`` rows each add a network block's worth of memory to what a core keeps in
    L3 (FedSECA's three came to 34 MB at n = 100), and aggregation ranks on one
    machine share that L3: two ranks spilled to DRAM and their sorting networks
    slowed by 40%. A multiple of 1024 columns, so that the chunks' vectorised
    loops (and their scalar tails) cover the columns one call over the block
    would: on the CPUs measured a chunked sum along dim 0 or product with a
    vector gives the block-wide bits. Among ranks the chunks are the same on
    every rank either way (their blocks are, :func:`sorted_block_width`)."""
    if device.type != "cpu":
        return 1 << 62
    return max(1, (1 << 18) // max(k, 1) // 1024) * 1024


SortedFn = Callable[[torch.Tensor, slice, Scratch], None]


def _fill_block(block: torch.Tensor, x: torch.Tensor, c0: int, c1: int, rows: Optional[torch.Tensor],
                scale: Optional[torch.Tensor], absolute: bool, ws: "Scratch") -> torch.Tensor:
    """Columns ``c0:c1`` of ``x`` (its ``rows`` if given, each row times ``scale``, absolute
    values if ``absolute``) written into ``block`` (``[n_rows, c1 - c0]``), which is returned."""
    src = x[:, c0:c1] if rows is None else \
        torch.index_select(x[:, c0:c1], 0, rows, out=ws("map.rows", block.shape[0], c1 - c0))
    if scale is not None:
        torch.mul(src, scale[:, None], out=block)
    else:
        block.copy_(src)
    if absolute:
        block.abs_()
    return block


def map_sorted_blocks(x: torch.Tensor, fn: SortedFn, *, rows: Optional[torch.Tensor] = None,
                      scale: Optional[torch.Tensor] = None, absolute: bool = False) -> None:
    """Call ``fn(t, cols, scratch)`` for consecutive column blocks ``cols`` of ``x``
    (CPU), ``t`` a contiguous ``[width, n]`` tensor whose row ``j`` is column
    ``cols.start + j`` of ``x[rows] * scale[:, None]`` (``abs`` if ``absolute``)
    sorted ascending, NaN last.

    The block is copied row by row into a contiguous ``[n, width]`` buffer
    (scaled there), transposed by torch's blocked transpose (a transpose read
    straight from ``x``'s strided rows costs 3x as much) and sorted in place by
    ``ndarray.sort`` along its rows: numpy 2.x sorts short float32 rows with
    AVX-512 sorting networks held in registers (x86-simd-sort), ~85 ns a row of
    100 values on the CPUs measured (~45 ns at 20: a fixed cost per row), while
    the two copies cost ~2 mean passes. Each row's sorted values depend on that column's values only.
    Blocks run on the worker threads (numpy's sort releases the GIL); the same
    contract on ``fn`` as :func:`map_sorted_columns`.
    """
    n_rows = x.shape[0] if rows is None else int(rows.numel())
    d = x.shape[1]
    if d == 0 or n_rows == 0:
        return
    width = _sort_block(n_rows)
    blocks = [(c, min(d, c + width)) for c in range(0, d, width)]

    def run(part: list[tuple[int, int]]) -> None:
        ws = Scratch(x.dtype, x.device)
        for c0, c1 in part:
            w = c1 - c0
            block = _fill_block(ws("sort.rows", n_rows, w), x, c0, c1, rows, scale, absolute, ws)
            t = ws("sort.cols", w, n_rows)
            t.copy_(block.t())
            t.numpy().sort(axis=1)
            fn(t, slice(c0, c1), ws)

    _run_parts(run, blocks)


def map_sorted_columns(x: torch.Tensor, fn: RowsFn, *, rows: Optional[torch.Tensor] = None,
                       scale: Optional[torch.Tensor] = None, absolute: bool = False,
                       need: Optional[tuple[int, ...]] = None, use: Optional[str] = None) -> None:
    """Call ``fn(sorted_rows, cols, scratch)`` for consecutive column blocks ``cols`` of ``x``.

    The matrix sorted per column is ``x[rows]`` (all rows if ``rows`` is None),
    times ``scale[:, None]`` if given, in absolute value if ``absolute``.
    ``sorted_rows[i]`` is the ``i``-th smallest value of each column of the block
    (a 1-D tensor of the block's width); with ``need``, only those positions are
    valid. A column holding NaN is NaN at every valid position. ``fn`` must only
    write to outputs at ``cols`` (blocks run concurrently) and must not call this
    function (the worker pool is shared); it takes its block-sized temporaries
    from ``scratch`` (:class:`Scratch`).

    On CPU the kernel is a pruned sorting network or numpy's sort of the
    transposed block (:func:`kernel`; ``use`` forces one, for tests and
    benchmarks). Both give every position's exact order statistic.
    """
    n_rows = x.shape[0] if rows is None else int(rows.numel())
    d = x.shape[1]
    if d == 0 or n_rows == 0:
        return
    if x.device.type != "cpu":
        _map_device(x, fn, rows, scale, absolute, n_rows)
        return
    need = tuple(sorted(set(need))) if need is not None else None
    if (_kernel_arg(use) or kernel(n_rows, need)) == "sort":
        _map_by_sort(x, fn, rows, scale, absolute, n_rows, need)
        return
    comps = network(n_rows, need)
    width = _block(n_rows)
    blocks = [(c, min(d, c + width)) for c in range(0, d, width)]

    def run(part: list[tuple[int, int]]) -> None:
        buf = torch.empty(n_rows + 1, width, dtype=x.dtype, device=x.device)
        ws = Scratch(x.dtype, x.device)
        for c0, c1 in part:
            w = c1 - c0
            _fill_block(buf[:n_rows, :w], x, c0, c1, rows, scale, absolute, ws)
            wires = [buf[i, :w] for i in range(n_rows + 1)]
            spare = n_rows
            for a, b in comps:
                # Pointer swap instead of a copy: the min goes to the spare row,
                # which then becomes wire a.
                torch.minimum(wires[a], wires[b], out=wires[spare])
                torch.maximum(wires[a], wires[b], out=wires[b])
                wires[a], wires[spare] = wires[spare], wires[a]
            fn(wires[:n_rows], slice(c0, c1), ws)

    _run_parts(run, blocks)


def _kernel_arg(use: Optional[str]) -> Optional[str]:
    if use not in (None, "network", "sort"):
        raise ValueError(f"use = {use!r}: a kernel must be 'network' or 'sort' (or None: the table's pick)")
    return use


def _map_by_sort(x, fn, rows, scale, absolute, n_rows, need) -> None:
    """:func:`map_sorted_columns` on numpy's sort (:func:`map_sorted_blocks`): the
    needed positions (all of them without ``need``) copied out as rows."""
    positions = list(range(n_rows)) if need is None else list(need)

    def each(t: torch.Tensor, cols: slice, ws: Scratch) -> None:
        w = t.shape[0]
        out = ws("sort.out", n_rows, w)
        if need is None:
            out.copy_(t.t())
        else:
            for i in positions:
                out[i].copy_(t[:, i])
        # NaN sorts last in numpy; the networks spread it to every output:
        # columns holding NaN are NaN at every position here too.
        nan = torch.isnan(t[:, n_rows - 1])
        if bool(nan.any()):
            for i in positions:
                out[i].masked_fill_(nan, float("nan"))
        fn([out[i] for i in range(n_rows)], cols, ws)

    map_sorted_blocks(x, each, rows=rows, scale=scale, absolute=absolute)


_POOL: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    # One long-lived pool per size: per-call thread start-up would dominate the
    # many small per-layer calls of a layerwise rule.
    with _POOL_LOCK:
        if workers not in _POOL:
            _POOL[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="defense-order")
        return _POOL[workers]


def _run_parts(run: Callable[[list[tuple[int, int]]], None], blocks: list[tuple[int, int]]) -> None:
    """Split column blocks among a few threads (torch ops release the GIL).

    While the workers run, torch's intra-op pool is set to one thread: each
    worker is one core's worth of work, and OpenMP teams forked from several
    workers at once would oversubscribe the cores (a thread adopts the process
    setting at its first parallel op, so the workers are serial for good).
    """
    workers = min(_threads(), len(blocks))
    if workers <= 1:
        run(blocks)
        return
    parts = [blocks[i::workers] for i in range(workers)]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for fut in [_pool(workers).submit(run, p) for p in parts]:
            fut.result()
    finally:
        torch.set_num_threads(previous)


def _map_device(x, fn, rows, scale, absolute, n_rows) -> None:
    d = x.shape[1]
    ws = Scratch(x.dtype, x.device)
    # Bound the temporary (values + int64 indices of torch.sort) to ~1/4 of x.
    width = max(1 << 16, d // 4)
    for c0 in range(0, d, width):
        c1 = min(d, c0 + width)
        block = x[:, c0:c1] if rows is None else x[:, c0:c1].index_select(0, rows)
        if scale is not None:
            block = block * scale[:, None]
        if absolute:
            block = block.abs()
        fn(list(torch.sort(block, dim=0).values.unbind(0)), slice(c0, c1), ws)


def positive_(z: torch.Tensor) -> torch.Tensor:
    """In place: 1 where ``z > 0``, else 0, in ``z``'s float dtype.

    Comparison masks are slow to produce on CPU and far slower to use in
    arithmetic (a bool operand costs ~40x a float multiply), so the
    coordinate-wise rules build their 0/1 masks with ``sign`` and ``clamp``.
    """
    return z.sign_().clamp_min_(0.0)


def median_1d(v: torch.Tensor) -> torch.Tensor:
    """Median of a small 1-D tensor, averaging the two middle values for even length."""
    s = torch.sort(v).values
    n = s.numel()
    return s[(n - 1) // 2] * 0.5 + s[n // 2] * 0.5


def column_median(x: torch.Tensor, *, rows: Optional[torch.Tensor] = None,
                  scale: Optional[torch.Tensor] = None, absolute: bool = False,
                  use: Optional[str] = None) -> torch.Tensor:
    """Coordinate-wise median of ``x[rows] * scale`` (mean of the two middle values for even n)."""
    k = x.shape[0] if rows is None else int(rows.numel())
    out = torch.empty(x.shape[1], dtype=x.dtype, device=x.device)
    lo, hi = (k - 1) // 2, k // 2

    def fn(r: Sequence[torch.Tensor], cols: slice, ws: Scratch) -> None:
        if lo == hi:
            out[cols] = r[lo]
        else:
            # Halves first: (a + b) / 2 overflows for two values near the float32 maximum.
            torch.mul(r[lo], 0.5, out=out[cols]).add_(r[hi], alpha=0.5)

    if x.device.type == "cpu" and (_kernel_arg(use) or kernel(k, (lo, hi))) == "sort":
        def middle(t: torch.Tensor, cols: slice, ws: Scratch) -> None:
            # Straight from the sorted rows (one per column), NaN columns NaN.
            if lo == hi:
                out[cols] = t[:, lo]
            else:
                torch.mul(t[:, lo], 0.5, out=out[cols]).add_(t[:, hi], alpha=0.5)
            nan = torch.isnan(t[:, k - 1])
            if bool(nan.any()):
                out[cols].masked_fill_(nan, float("nan"))

        map_sorted_blocks(x, middle, rows=rows, scale=scale, absolute=absolute)
        return out
    map_sorted_columns(x, fn, rows=rows, scale=scale, absolute=absolute, need=(lo, hi), use=use)
    return out


def abs_block_width(n: int) -> int:
    """Columns per block for the blocked passes over ``|x|`` (~1 MiB per block: the
    several passes each block takes stay in a core's L2)."""
    return max(1 << 12, min(1 << 17, (1 << 18) // max(n, 1)))


class RowKthAbs:
    """The ``k``-th smallest ``|x_ij|`` of each row ``i`` (1-based ``k``), exactly,
    from one blocked pass that the caller may share with other work.

    ``torch.kthvalue`` copies the whole matrix plus an int64 index per element
    (three copies' worth of memory) and quick-selects rows one by one. Here a
    sample of each row brackets the answer; :meth:`observe` (fed ``|x|`` of every
    column block once) counts the values below the bracket and gathers the few
    inside it; :meth:`result` runs ``kthvalue`` on the gathered values only. The
    sample only affects speed: a row whose bracket misses (checked by the
    counts) falls back to an exact ``kthvalue`` of that row.

    Among aggregation ranks (``shards``, :class:`.base.Shards`, each rank
    observing the blocks of its own column span, see :meth:`share`) the
    per-row work splits by rows: each rank brackets and selects the rows of its
    row span (:meth:`.base.Shards.spans` of ``n``) and the results are
    gathered. An order statistic is one of the row's values, whoever finds it:
    every rank returns the one-rank result bit for bit.
    """

    def __init__(self, x: torch.Tensor, k: int, shards: Shards = LOCAL) -> None:
        n, d = x.shape
        if not 1 <= k <= d:
            raise ValueError(f"k = {k} out of range for rows of {d} values")
        self.x, self.k, self.shards = x, k, shards
        self.row_sizes = [b - a for a, b in shards.spans(n)]
        self.r0, self.r1 = shards.span(n)
        self.direct = d <= (1 << 16)
        if self.direct:
            return
        pos = self.sample_positions(d)
        s = pos.numel()
        sample = x[self.r0:self.r1].index_select(1, pos.to(x.device)).abs_()
        q = (k - 1) / (d - 1)
        # 4 standard deviations of the sample rank each side (a miss, about 1 row
        # in 30,000, only costs that row an exact kthvalue).
        centre, margin = q * (s - 1), 4.0 * math.sqrt(s * q * (1 - q)) + 16
        lo_i, hi_i = max(0, int(math.floor(centre - margin))), min(s - 1, int(math.ceil(centre + margin)))
        # Both bracket ends from the sample's lo_i-th..hi_i-th order statistics:
        # one topk of the shorter tail that contains them, then min/max and one
        # kthvalue on that.
        if self.r1 == self.r0:
            lo = hi = sample.new_zeros(0)
        elif s - lo_i <= hi_i + 1:
            tail = torch.topk(sample, s - lo_i, dim=1, sorted=False).values
            lo, hi = tail.amin(1), torch.kthvalue(tail, hi_i - lo_i + 1, dim=1).values
        else:
            tail = torch.topk(sample, hi_i + 1, dim=1, largest=False, sorted=False).values
            lo, hi = torch.kthvalue(tail, lo_i + 1, dim=1).values, tail.amax(1)
        if shards.world_size > 1:
            both = shards.gather(torch.stack([lo, hi], 1), self.row_sizes)
            lo, hi = both[:, 0], both[:, 1]
        if lo_i == 0:
            lo = torch.zeros(n, dtype=x.dtype, device=x.device)
        if hi_i == s - 1:
            hi = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
        self.lo, self.hi = lo.contiguous()[:, None], hi.contiguous()[:, None]
        if x.device.type == "cpu":
            self.lo_np, self.hi_np = self.lo.numpy(), self.hi.numpy()
        self.below = torch.zeros(n, dtype=torch.long, device=x.device)
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.shared: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @staticmethod
    def sample_positions(d: int) -> torch.Tensor:
        """The sampled columns: runs of 256 consecutive values (cache-friendly to
        gather) starting at golden-ratio-spread offsets (no aliasing with periodic
        layouts), 16K-64K values in all."""
        s, run = max(1 << 14, min(1 << 16, d // 128)), 256
        starts = (torch.arange(s // run, dtype=torch.float64) * 0.6180339887498949).frac().mul(d - run).long()
        return (torch.sort(starts).values[:, None] + torch.arange(run)).flatten()

    def observe(self, a: torch.Tensor, ws: Scratch) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """What one column block of ``|x|`` contributes; thread-safe (it changes
        nothing): hand every block's part to :meth:`absorb` exactly once."""
        if self.direct:
            return None
        # Counts from comparisons written to float outputs, which run at the
        # speed of a multiply (bool outputs are several times slower on CPU).
        # (Float32 sums of 0/1 are exact: a block has fewer than 2^24 columns.)
        m = torch.lt(a, self.lo, out=ws("kth.mask", *a.shape))
        below = m.sum(1)
        inside = torch.le(a, self.hi, out=m).sum(1).sub_(below)
        if a.device.type == "cpu":
            # The values inside the bracket, row-major. torch's boolean
            # compaction costs ~1 ns per scanned value on CPU, numpy's a quarter
            # of that; ``a.numpy()`` is a zero-copy view of this block (no copy
            # of the matrix, no size limit), and the selection itself stays in
            # torch (:meth:`result`).
            v = a.numpy()
            vals = torch.from_numpy(v[(v >= self.lo_np) & (v <= self.hi_np)])
        else:
            vals = a[(a >= self.lo) & (a <= self.hi)]
        return below.long(), inside.long(), vals

    def absorb(self, part: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        if part is not None:
            self.below += part[0]
            self.parts.append(part[1:])

    def share(self, blocks: Sequence[int]) -> None:
        """Among aggregation ranks that each absorbed the parts of their own column
        blocks (``blocks[r]`` of them on rank ``r``, ranks in column order): every
        rank's parts, so that :meth:`result` (every rank selecting its rows) gives
        the one-rank result."""
        shards = self.shards
        if self.direct or shards.world_size == 1:
            return
        n = self.x.shape[0]
        self.below = shards.all_reduce_sum(self.below)
        dev = self.below.device
        # Per block: the row counts, then how many values it gathered (the same
        # number unless a row holds NaN, whose bracket is NaN).
        counts = torch.stack([torch.cat([p[0], p[0].new_tensor([p[1].numel()])]) for p in self.parts]) \
            if self.parts else torch.zeros(0, n + 1, dtype=torch.long, device=dev)
        vals = torch.cat([p[1] for p in self.parts]) if self.parts else torch.zeros(0, dtype=self.x.dtype, device=dev)
        every = shards.gather(counts, blocks)                         # [all blocks, n + 1]
        ends = [sum(blocks[:r + 1]) for r in range(len(blocks))]
        per_block = every[:, n]
        per_rank = [int(per_block[e - b:e].sum()) for b, e in zip(blocks, ends)]
        self.shared = (every[:, :n], shards.gather(vals.to(dev), per_rank))
        self.parts = []

    def result(self) -> torch.Tensor:
        """The ``[n]`` order statistics (this rank selects its rows, see the class docstring)."""
        x, k, r0, r1 = self.x, self.k, self.r0, self.r1
        if self.direct:
            out = torch.kthvalue(x[r0:r1].abs(), k, dim=1).values if r1 > r0 else x.new_zeros(0)
        else:
            if self.shared is not None:
                counts, vals = self.shared
            else:
                counts = torch.stack([p[0] for p in self.parts]) if self.parts else \
                    torch.zeros(0, x.shape[0], dtype=torch.long, device=x.device)
                vals = torch.cat([p[1] for p in self.parts]) if self.parts else x.new_zeros(0)
            if (r0, r1) != (0, x.shape[0]):
                counts, vals = _rows_of_segments(counts, vals, r0, r1)
            out = self._select(counts, vals, k - self.below[r0:r1], r0)
        if self.shards.world_size > 1:
            out = self.shards.gather(out, self.row_sizes)
        return out

    def _select(self, counts: torch.Tensor, vals: torch.Tensor, rank: torch.Tensor, r0: int) -> torch.Tensor:
        """Rows ``r0 ...`` of the result from their gathered values ``vals`` (block
        by block, row-major inside a block; ``counts[b, i]`` of them for block ``b``
        and row ``r0 + i``) and the 1-based ``rank`` of the answer among them."""
        x = self.x
        m = int(rank.numel())
        total = counts.sum(0)
        ok = (rank >= 1) & (rank <= total)
        out = torch.empty(m, dtype=x.dtype, device=x.device)
        if bool(ok.any()):
            # One kthvalue for all rows: row i is padded in front with K - rank_i
            # copies of -inf so that its K-th smallest is its rank_i-th gathered value.
            rank_ok = torch.where(ok, rank, torch.ones_like(rank))
            kk = int(rank_ok.max())
            shift = kk - rank_ok
            width = int((shift + total).max())
            padded = torch.full((m, width), float("inf"), dtype=x.dtype, device=x.device)
            padded.masked_fill_(torch.arange(width, device=x.device)[None, :] < shift[:, None], float("-inf"))
            # One segment of values per (block, row). A value's flat position in
            # ``padded`` is its row's start + shift + values of that row in earlier
            # blocks + its place in the segment = its index in ``vals`` + a
            # per-segment offset.
            flat = counts.flatten()
            seg_rows = torch.arange(m, device=x.device).repeat(counts.shape[0])
            before = (torch.cumsum(counts, 0) - counts).flatten()
            seg_start = torch.cumsum(flat, 0) - flat
            offset = seg_rows * width + shift[seg_rows] + before - seg_start
            pos = torch.repeat_interleave(offset, flat).add_(torch.arange(vals.numel(), device=x.device))
            padded.view(-1).index_copy_(0, pos, vals)
            out = torch.kthvalue(padded, kk, dim=1).values
        for i in torch.nonzero(~ok).flatten().tolist():
            out[i] = torch.kthvalue(x[r0 + i].abs(), self.k).values
        return out


def _rows_of_segments(counts: torch.Tensor, vals: torch.Tensor, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The counts and values of rows ``r0:r1`` only, from values laid out block by
    block, row-major inside a block (``counts[b, i]`` of them for block ``b``, row
    ``i``): in each block those rows' values are one run."""
    ends = torch.cumsum(counts.sum(1), 0)
    starts = ends - counts.sum(1)
    a = (starts + counts[:, :r0].sum(1)).tolist()
    b = (starts + counts[:, :r1].sum(1)).tolist()
    runs = [vals[i:j] for i, j in zip(a, b) if j > i]
    return counts[:, r0:r1], torch.cat(runs) if runs else vals[:0]


def map_column_blocks(x: torch.Tensor, fn: Callable[[torch.Tensor, Scratch], object], width: int) -> list[object]:
    """``[fn(x[:, c:c + width], scratch) for each column block]``, in block order,
    computed on the worker threads (``fn`` must be thread-safe and must not keep
    references to ``scratch`` tensors in what it returns)."""
    d = x.shape[1]
    blocks = [(c, min(d, c + width)) for c in range(0, d, width)]
    found: dict[int, object] = {}

    def run(part: list[tuple[int, int]]) -> None:
        ws = Scratch(x.dtype, x.device)
        for c0, c1 in part:
            found[c0] = fn(x[:, c0:c1], ws)

    if x.device.type != "cpu":
        run(blocks)
    else:
        _run_parts(run, blocks)
    return [found[c0] for c0, _ in blocks]


def row_kth_abs(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest ``|x_ij|`` of each row (1-based ``k``), exactly (:class:`RowKthAbs`)."""
    sel = RowKthAbs(x, k)
    if not sel.direct:
        def one(b: torch.Tensor, ws: Scratch):
            return sel.observe(torch.abs(b, out=ws("kth.abs", *b.shape)), ws)

        for part in map_column_blocks(x, one, abs_block_width(x.shape[0])):
            sel.absorb(part)
    return sel.result()
