"""The one pairwise-distance routine: everything derives from a Gram matrix.

Every rule that compares updates (Krum, Multi-Krum, Bulyan, GeoMed, RFA, NNM,
centered clipping, STPA) reads what it needs off the ``n x n`` Gram matrix of
the ``[n, d]`` updates, built by :func:`frame` with one pass over the matrix
(or one per layer: per-layer Gram matrices come from column slices, which are
zero-copy views). FedSECA's sign concordance is the Gram matrix of ``sign(X)``,
summed over column blocks by :func:`blocked_gram`.

What the ``n x n`` matrix gives:

* squared Euclidean distance: ``G_ii + G_jj - 2 G_ij``;
* norms ``||x_i||`` and cosine similarity ``G_ij / (||x_i|| ||x_j||)``, defined
  as 0 when either row has zero norm (a zero slice is orthogonal to everything,
  itself included, so a layer every client left untouched ranks nobody ahead of
  anybody);
* rows rescaled by ``s`` (clipping) without touching ``X``.

Exactness. Distances are translation-invariant, so :func:`frame` may take the
Gram matrix of ``x_i - r`` for a reference row ``r`` (a *centred* frame). A
float32 Gram product of rows that share a large common part (spread / common
about 1e-3, as late in training) cancels catastrophically in ``G_ii + G_jj - 2
G_ij``: Krum and GeoMed picked differently from exact arithmetic in 8-10 of 10
such inputs. Centred on one of the rows, the products are of the spread alone
and the picks are the exact ones. So, for the Euclidean rules:

* float64 updates, and float32 ones of at most ``SMALL_D`` columns (converted
  to float64, where every product of two float32 values is exact): one
  float64 product, uncentred (float64 has ~1e9 times the headroom);
* longer float32 updates: a 2048-column sample (in float64) tells whether the
  rows share a common part large against their spread and, if so, which row is
  central (least median distance to the others: an honest majority puts an
  honest row there); the Gram matrix is then taken of the rows minus that row,
  block by block in cache-sized scratch (the subtraction reads the matrix once
  more; the products leave that row out, since it is zero, and from 96 rows take
  only the upper block triangle of the symmetric matrix, see
  :func:`_accumulate_gram`); without a
  common part, one float32 product as before. A check on the result (the
  median ``||x_i - r||^2`` against the median distance) catches a reference
  the sample misjudged and recomputes once, centred on the full data's central row.

Cosine similarity is *not* translation-invariant: the cosine rules (and STPA)
keep the uncentred Gram matrix, exact in float64 and as before in float32,
where ``1 - cos`` near 0 keeps float32's cancellation. That is what is exact
for them; the centred frame is for the Euclidean rules.

Extreme values. Nothing above may overflow, whatever a client sends: a float32
product of a row holding 3e19 is inf, and inf * 0 turned whole aggregates into
NaN. When a product is not finite, the blocks are redone with each row scaled
by a power of two at least its largest magnitude (exact), the products rescaled
in float64 (where the Gram entries of float32 rows up to 3.4e38 fit), so the
distances to a huge row are huge and finite and every other entry is untouched.
Rows holding NaN or Inf come out marked in ``Frame.finite``; the rules leave
them out (see :mod:`._gram_rule`).

The ``n x n`` work runs in float64 on the CPU: it is tiny, and it keeps selection
decisions (argmins, sorts, clustering) off the accelerator's launch queue.
"""
from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from .base import DefenseError

if TYPE_CHECKING:
    from ._order import Scratch

DISTANCES = ("euclidean", "cosine")

# float32 updates up to this many columns get an exact float64 Gram product.
SMALL_D = 1 << 14
# Sampled columns that decide whether (and on which row) to centre.
SAMPLE_COLUMNS, SAMPLE_RUN = 2048, 256
# Centre when the median ||x_i||^2 exceeds this multiple of the median distance.
CENTRE_RATIO = 8.0
# Recompute (once) when the median ||x_i - r||^2 of the result exceeds this
# multiple of the median distance (a poor reference, or a common part the sample missed).
RETRY_RATIO = 256.0


def gram(x: torch.Tensor) -> torch.Tensor:
    """``x @ x.T`` (one matrix product) as an ``[n, n]`` float64 CPU tensor."""
    return (x @ x.T).to("cpu", torch.float64)


# ---------------------------------------------------------------------- frames

@dataclass
class Frame:
    """Gram matrix ``g`` (float64, CPU) of ``m`` points relative to a reference
    ``r``: the ``n`` update rows, then ``extra`` given points, then the origin
    (when ``origin``). ``centred = False`` means ``r = 0`` (the plain Gram
    matrix; the origin's row and column are then zero). ``finite[i]`` is False
    for an update row holding NaN or Inf (its entries are meaningless)."""

    g: torch.Tensor
    n: int
    finite: torch.Tensor
    extra: int = 0
    origin: bool = False
    centred: bool = False

    @property
    def o(self) -> int:
        """Index of the origin point."""
        if not self.origin:
            raise DefenseError("internal: this frame has no origin point")
        return self.n + self.extra

    @property
    def all_finite(self) -> bool:
        return bool(self.finite.all())

    def restrict(self, keep: torch.Tensor) -> "Frame":
        """The frame of update rows ``keep`` (and the same extra points / origin)."""
        idx = torch.cat([keep.to(torch.long), torch.arange(self.n, self.g.shape[0])])
        return Frame(self.g[idx][:, idx], int(keep.numel()), torch.ones(int(keep.numel()), dtype=torch.bool),
                     self.extra, self.origin, self.centred)

    def sq_norms(self) -> torch.Tensor:
        """``||x_i||^2`` of the update rows."""
        g, n = self.g, self.n
        if not self.centred:
            return g.diagonal()[:n].clamp_min(0.0)
        o = self.o
        return (g.diagonal()[:n] + g[o, o] - 2.0 * g[:n, o]).clamp_min(0.0)

    def dots(self) -> torch.Tensor:
        """``x_i . x_j`` of the update rows (uncentred)."""
        g, n = self.g, self.n
        if not self.centred:
            return g[:n, :n]
        o = self.o
        return g[:n, :n] - g[:n, o][:, None] - g[o, :n][None, :] + g[o, o]


def frame(x: torch.Tensor, *, centre: bool, origin: bool = False, extra: Optional[torch.Tensor] = None) -> Frame:
    """The :class:`Frame` of the rows of ``x`` (``[n, d]``), plus the rows of
    ``extra`` (``[k, d]``) and the origin if asked. ``centre`` asks for distances
    exact under a large common part (the Euclidean rules); without it the frame
    is the plain Gram matrix (what cosine needs)."""
    n, d = x.shape
    ne = 0 if extra is None else int(extra.shape[0])
    if not x.is_floating_point():
        x = x.to(torch.float32)
    if extra is not None:
        extra = extra.to(x.device, x.dtype)
    small = d <= SMALL_D and x.dtype != torch.float64
    if small:
        x = x.to(torch.float64)
        extra = None if extra is None else extra.to(torch.float64)
    if not centre or x.dtype == torch.float64 or n < 2 or d == 0:
        return _plain(x, extra, origin, ne)
    ref = _sample_reference(x)
    fr = _plain(x, extra, origin, ne) if ref is None else _centred(x, extra, origin, ne, ref)
    worse = _needs_retry(fr)
    if worse is not None and worse != ref:
        fr = _centred(x, extra, origin, ne, worse)
    return fr


def _plain(x: torch.Tensor, extra: Optional[torch.Tensor], origin: bool, ne: int) -> Frame:
    n = x.shape[0]
    m = n + ne + int(origin)
    if m == n:
        g = (x @ x.T).to("cpu", torch.float64)
    else:
        g = torch.zeros(m, m, dtype=torch.float64)
        g[:n, :n] = (x @ x.T).to("cpu", torch.float64)
    if extra is not None:
        xe = (x @ extra.T).to("cpu", torch.float64)
        g[:n, n:n + ne] = xe
        g[n:n + ne, :n] = xe.T
        g[n:n + ne, n:n + ne] = (extra @ extra.T).to("cpu", torch.float64)
    if bool(torch.isfinite(g).all()):
        return Frame(g, n, torch.ones(n, dtype=torch.bool), ne, origin, centred=False)
    g, finite = _blocks(x, extra, origin, None, scaled=True)
    return Frame(g, n, finite, ne, origin, centred=False)


def _centred(x: torch.Tensor, extra: Optional[torch.Tensor], origin: bool, ne: int, ref: int) -> Frame:
    n = x.shape[0]
    g, finite = _blocks(x, extra, origin, ref, scaled=False)
    if not bool(torch.isfinite(g).all()):
        g, finite = _blocks(x, extra, origin, ref, scaled=True)
    return Frame(g, n, finite, ne, origin, centred=True)


def _block_width(m: int, device: torch.device, d: int) -> int:
    if device.type != "cpu":
        return max(1 << 16, -(-d // 4))
    # ~2 MiB of float32 scratch per block: in cache for the product that follows
    # the subtraction, wide enough that per-block dispatch stays negligible.
    return max(4096, min(1 << 17, (1 << 19) // max(m, 1)))


_SCRATCH = threading.local()


def _block_scratch(dtype: torch.dtype, device: torch.device) -> "Scratch":
    """This thread's scratch for the blocks of :func:`_blocks`, kept from call to
    call on CPU (the pool's threads live on). A fresh ~2 MiB buffer per call is a
    fresh mapping under the orchestrator's heap settings, and its page faults
    cost ~0.1x a Gram product at n = 20."""
    from ._order import Scratch

    if device.type != "cpu":
        return Scratch(dtype, device)
    kept = getattr(_SCRATCH, "kept", None)
    if kept is None:
        kept = _SCRATCH.kept = {}
    ws = kept.get(dtype)
    if ws is None:
        ws = kept[dtype] = Scratch(dtype, device)
    return ws


def _blocks(x: torch.Tensor, extra: Optional[torch.Tensor], origin: bool, ref: Optional[int],
            scaled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram matrix of the points minus row ``ref`` of ``x`` (0 if None), summed in
    float64 over column blocks; ``scaled`` rescales each row of each block by a
    power of two first (no overflow, exact) and marks non-finite rows."""
    from ._order import _run_parts

    n, d = x.shape
    ne = 0 if extra is None else extra.shape[0]
    m = n + ne + int(origin)
    # Centred and unscaled, row ref minus itself is exactly zero: it is left out
    # of the products (k rows), and its row and column of g are zero.
    skip = not scaled and ref is not None
    k = m - int(skip)
    # Zero rows after the k real ones, up to a row count the CPU products run fast at
    # (see _padded_rows); they add nothing to the sums and are cut off at the end.
    kp = _padded_rows(k) if not scaled and x.device.type == "cpu" else k
    width = _block_width(kp, x.device, d)
    blocks = [(c, min(d, c + width)) for c in range(0, d, width)]
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    lock = threading.Lock()
    fill = _fill_scaled if scaled else _fill_plain

    # float32 products of a few blocks add up in float32 (in place, one call per
    # product), as one matrix product over their columns would; those partial
    # sums add up in float64.
    fold = not scaled and x.dtype == torch.float32 and x.device.type == "cpu"

    def run(part: list[tuple[int, int]]) -> None:
        ws = _block_scratch(x.dtype, x.device)
        acc = torch.zeros(kp, kp, dtype=torch.float64, device=x.device)
        lo = torch.zeros(kp, kp, dtype=torch.float32) if fold else acc
        fin = torch.ones(m, dtype=torch.bool, device=x.device)
        for i, (c0, c1) in enumerate(part, 1):
            buf = ws("frame", kp, c1 - c0)
            if kp > k:
                buf[k:].zero_()
            fill(buf, x[:, c0:c1], None if extra is None else extra[:, c0:c1], origin, ref, lo, fin)
            if fold and (i % FOLD_BLOCKS == 0 or i == len(part)):
                acc.add_(lo)
                lo.zero_()
        with lock:
            found[part[0][0]] = (acc, fin)

    if x.device.type == "cpu" and (scaled or kp >= GROUPS_FROM):
        _run_parts(run, blocks)
    else:
        # Fewer rows: one pass whose subtractions and products use torch's intra-op
        # threads. Against the blocks split among worker threads (two threads, wall
        # clock, d = 1M, BENCHMARKS.md "exact float32 distances"): 0.65x the time at
        # n = 20, 0.88x at 32, ~0.98x at 50 and 64; from 96 rows the workers win (0.93x at 100).
        run(blocks)
    parts = [found[c] for c in sorted(found)]  # a fixed order: the same sums every run
    acc, fin = parts[0]
    for pa, pf in parts[1:]:
        acc = acc + pa
        fin = fin & pf
    acc, fin = acc[:k, :k].cpu(), fin[:n].cpu()
    acc = torch.triu(acc) + torch.triu(acc, 1).T  # the products fill the upper triangle
    if skip:
        keep = torch.cat([torch.arange(ref), torch.arange(ref + 1, m)])
        g = torch.zeros(m, m, dtype=torch.float64)
        g[keep[:, None], keep[None, :]] = acc
    else:
        g = acc
    if scaled:
        # Entries too large even for float64 (float64 rows beyond ~1e150): such a
        # row cannot be compared with the others either.
        fin = fin & torch.isfinite(g.diagonal()[:n])
    return g, fin


def _fill_plain(buf, xb, eb, origin, ref, acc, fin) -> None:
    """The block's rows other than ``ref``, then ``extra``, then the origin, all
    minus row ``ref``, into ``buf``; their products into ``acc``."""
    n = xb.shape[0]
    r = xb[ref]
    torch.sub(xb[:ref], r, out=buf[:ref])
    torch.sub(xb[ref + 1:], r, out=buf[ref:n - 1])
    if eb is not None:
        torch.sub(eb, r, out=buf[n - 1:n - 1 + eb.shape[0]])
    if origin:
        torch.neg(r, out=buf[n - 1 + (0 if eb is None else eb.shape[0])])
    _accumulate_gram(buf, acc)


# Row groups of the block products on CPU (see _accumulate_gram); blocks whose
# float32 products add up in float32 before joining the float64 sum (_blocks).
GROUP_ROWS, GROUPS_FROM, FOLD_BLOCKS = 48, 96, 8


def _padded_rows(k: int) -> int:
    """Rows for the block products of ``k`` points on CPU: ``k``, or the next multiple
    of 16 when ``k`` is 13-15 past one. MKL runs a group of 13-15 rows far below its
    speed on 16 (measured on a block in cache, one thread, with the row groups of
    :func:`_accumulate_gram`: 15 rows padded to 16 took 0.33x the time, 31 to 32 0.51x,
    47 to 48 0.63x, 63 to 64 0.69x, 95 to 96 0.63x, 13 to 16 0.53x, 29 to 32 0.69x), and
    a centred frame of n = 16, 32, ... updates has such a count once its reference row
    is left out: it took 1.4-3.2x the uncentred frame before."""
    rest = k % 16
    return k + (16 - rest) if rest >= 13 else k


def _row_groups(m: int) -> list[tuple[int, int]]:
    """Row ranges whose pairwise products make up a block's Gram matrix on CPU:
    groups of a multiple of 16 rows, then the rest (see :func:`_accumulate_gram`)."""
    h = (m // 16) * 16 if m % 8 else m
    h = h or m
    step = GROUP_ROWS if h >= GROUPS_FROM else h
    cuts = list(range(0, h, step)) + [h] + ([m] if h < m else [])
    return [(cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)]


def _accumulate_gram(buf: torch.Tensor, acc: torch.Tensor) -> None:
    """The upper block triangle of ``buf @ buf.T`` added to ``acc`` (the caller
    mirrors it): in place when ``acc`` has ``buf``'s dtype, else converted.

    MKL's product of a block with itself runs at its best for row counts that
    are multiples of 8 and slowly in between (on the 2-core VM of BENCHMARKS.md,
    20 rows take 1.27x the time of 16 rows per entry, 21 rows 1.7x), so on CPU
    the rows split into a multiple of 16 and the rest (extra points and the
    origin included). From 96 rows the multiple of 16 splits again into groups
    of 48, and only the products on and above the diagonal of groups are taken
    (the matrix is symmetric). Each product adds into its place with one call,
    which matters at ~40 blocks per million columns. On a block in cache, against
    one product of all rows (``torch.mm`` then a float64 add): 0.57x the time at
    19 rows, 0.73x at 49, 0.72x at 99, 0.80x at 100.
    """
    if buf.device.type != "cpu":
        acc.add_(buf @ buf.T)
        return
    groups = _row_groups(buf.shape[0])
    same = acc.dtype == buf.dtype
    for i, (a0, a1) in enumerate(groups):
        rows = buf[a0:a1]
        for b0, b1 in groups[i:]:
            out = acc[a0:a1, b0:b1]
            if same:
                torch.addmm(out, rows, buf[b0:b1].T, out=out)
            else:
                out.add_(rows @ buf[b0:b1].T)


def _row_bounds(rows: torch.Tensor) -> torch.Tensor:
    """Per row, a bound on ``|value|``: the norm (a fast reduction) where it is finite
    and moderate, else the largest magnitude (NaN or Inf for such rows)."""
    top = torch.linalg.vector_norm(rows, dim=1)
    odd = torch.nonzero(~(top < _MODERATE)).flatten()
    if odd.numel():
        # A max-reduction runs ~10x slower than a sum here: only for these rows.
        top[odd] = torch.linalg.vector_norm(rows.index_select(0, odd), ord=math.inf, dim=1)
    return top


def _fill_scaled(buf, xb, eb, origin, ref, acc, fin) -> None:
    n = xb.shape[0]
    ne = 0 if eb is None else eb.shape[0]
    top = _row_bounds(xb)
    if eb is not None:
        top = torch.cat([top, _row_bounds(eb)])
    ok = torch.isfinite(top)
    safe = torch.where(ok, top, torch.zeros_like(top))
    r = None
    if ref is not None and bool(ok[ref]):
        r, top_r = xb[ref], safe[ref]
    else:
        top_r = torch.zeros((), dtype=top.dtype, device=top.device)
    bound = torch.maximum(safe, top_r)
    if origin:
        bound = torch.cat([bound, top_r.reshape(1)])
    # 2^e >= |value| for every value of the row (and of r): scaled rows are at
    # most 2 in magnitude, their products at most 4 * width; exact powers of two.
    e = torch.frexp(bound).exponent
    inv = torch.ldexp(torch.ones_like(bound), -e)
    scale = torch.ldexp(torch.ones(e.shape, dtype=torch.float64, device=e.device), e.to(torch.float64))
    rows = buf[:n + ne]
    torch.mul(xb, inv[:n, None], out=buf[:n])
    if eb is not None:
        torch.mul(eb, inv[n:n + ne, None], out=buf[n:n + ne])
    if r is not None:
        rows.addcmul_(r[None, :], inv[:n + ne, None], value=-1.0)
    rows.masked_fill_(~ok[:, None], 0.0)
    if origin:
        if r is not None:
            torch.mul(r, -inv[-1], out=buf[-1])
        else:
            buf[-1].zero_()
    acc.add_((buf @ buf.T).to(torch.float64).mul_(scale[:, None]).mul_(scale[None, :]))  # the rare path
    fin[:n + ne] &= ok


_MODERATE = 2.0 ** 60


def _sample_starts(d: int) -> list[int]:
    """Starts of the sampled runs of SAMPLE_RUN consecutive columns, spread by the
    golden ratio (no aliasing with periodic layouts), sorted."""
    runs = SAMPLE_COLUMNS // SAMPLE_RUN
    starts = (torch.arange(runs, dtype=torch.float64) * 0.6180339887498949).frac().mul(d - SAMPLE_RUN).long()
    return torch.sort(starts).values.tolist()


def _sample_positions(d: int) -> torch.Tensor:
    return (torch.tensor(_sample_starts(d))[:, None] + torch.arange(SAMPLE_RUN)).flatten()


def _sq_dist(g: torch.Tensor) -> torch.Tensor:
    diag = g.diagonal()
    return (diag[:, None] + diag[None, :] - 2.0 * g).clamp_min_(0.0)


def _far_from_reference(g: torch.Tensor, ok: Optional[torch.Tensor], ratio: float) -> Optional[int]:
    """With ``g`` the Gram matrix relative to some reference ``r``: the central row
    (least median squared distance to the others, lowest index on ties) when the
    median ``||x_i - r||^2`` exceeds ``ratio`` times the median of those medians
    (then ``r`` is a poor centre: float32 products would lose the distances),
    else None. Both medians are robust: with an honest majority they are honest
    distances however far the others are. Rows where ``ok`` is False are ignored."""
    idx = None
    if ok is not None and not bool(ok.all()):
        idx = torch.nonzero(ok).flatten()
        g = g[idx][:, idx]
    k = g.shape[0]
    if k < 2:
        return None
    dist = _sq_dist(g)
    dist.fill_diagonal_(float("inf"))
    typical = dist.sort(1).values[:, (k - 2) // 2]
    if not float(g.diagonal().median()) > ratio * float(typical.median()):
        return None
    c = int(torch.sort(typical, stable=True).indices[0])
    return c if idx is None else int(idx[c])


def _sample_reference(x: torch.Tensor) -> Optional[int]:
    """Row to centre on, or None when the rows share no common part large against
    their spread (then the plain float32 product loses nothing)."""
    # Slices, not index_select: along dim 1 of a layer's strided view it is ~50x slower.
    s = torch.cat([x[:, c:c + SAMPLE_RUN] for c in _sample_starts(x.shape[1])], dim=1).to(torch.float64)
    g = (s @ s.T).cpu()
    return _far_from_reference(g, torch.isfinite(g.diagonal()), CENTRE_RATIO)


def _needs_retry(fr: Frame) -> Optional[int]:
    """A better reference row when the frame's rows are far from its reference
    compared with their distances to each other, else None."""
    n = fr.n
    return _far_from_reference(fr.g[:n, :n], None if fr.all_finite else fr.finite, RETRY_RATIO)


# ----------------------------------------------------------- sign Gram (FedSECA)

def blocked_gram(x: torch.Tensor, transform: Callable[[torch.Tensor, "Scratch"], torch.Tensor],
                 visit: Optional[Callable[[torch.Tensor, "Scratch"], Any]] = None) -> tuple[torch.Tensor, list[Any]]:
    """The Gram matrix of ``transform(x)``, accumulated over column blocks on the
    worker threads so that the transformed matrix is never materialised; also
    ``[visit(block, scratch) for each raw block]``, for rules that need other per-column
    statistics from the same pass over the matrix (FedSECA). Per-block products
    are exact for sign matrices (integer sums below 2^24) and summed in float64.
    Both take the worker's :class:`._order.Scratch` for block-sized temporaries
    (``transform``'s result may live there). A ``transform`` may return int8 (see :func:`int8_products`): the block
    products then run as int8 x int8 -> int32 matrix products, exact as well.
    """
    from ._order import abs_block_width, map_column_blocks

    def one(block: torch.Tensor, ws: Scratch) -> tuple[torch.Tensor, Any]:
        t = transform(block, ws)
        g = torch._int_mm(t, t.T) if t.dtype == torch.int8 else t @ t.T
        return g.to(torch.float64), (None if visit is None else visit(block, ws))

    parts = map_column_blocks(x, one, abs_block_width(x.shape[0]))
    g = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
    for pg, _ in parts:
        g += pg
    return g.cpu(), [v for _, v in parts]


def int8_products(n: int, device: torch.device) -> bool:
    """Whether small-integer Gram products of ``n`` rows are faster in int8 here.

    On CPU, ``torch._int_mm`` (int8 x int8 -> int32) beats float32 GEMM from about
    48 rows on (0.58x the time at n = 100 on the 2-core AVX-512 VM of
    BENCHMARKS.md, 1.5x slower at n = 20); elsewhere float32 is used.
    """
    return device.type == "cpu" and n >= 48 and _int_mm_works()


@functools.lru_cache(maxsize=1)
def _int_mm_works() -> bool:
    try:
        a = torch.ones(48, 64, dtype=torch.int8)
        return bool(torch._int_mm(a, a.T)[0, 0] == 64)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


# ------------------------------------------------------------------- row norms

def row_norms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||x_i||, finite_i)``: norms as float64 CPU, overflow- and underflow-safe
    (a row whose norm over- or underflows in ``x``'s dtype is redone scaled by its
    largest magnitude), and whether each row holds only finite values."""
    norms = torch.linalg.vector_norm(x, dim=1).to("cpu", torch.float64)
    finite = torch.isfinite(norms)
    redo = torch.nonzero(~finite | (norms == 0)).flatten()
    if redo.numel():
        rows = x.index_select(0, redo.to(x.device))
        top = torch.linalg.vector_norm(rows, ord=math.inf, dim=1)
        ok = torch.isfinite(top) & (top > 0)
        safe = torch.where(ok, top, torch.ones_like(top))
        again = torch.linalg.vector_norm(rows / safe[:, None], dim=1).to("cpu", torch.float64) * \
            safe.to("cpu", torch.float64)
        ok_cpu, zero = ok.cpu(), (top == 0).cpu()
        fallback = torch.full_like(again, float("nan")).masked_fill_(zero, 0.0)
        norms[redo] = torch.where(ok_cpu, again, fallback)
        finite[redo] = ok_cpu | zero
    return norms, finite


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """``[n]`` bool (CPU): rows holding NaN or Inf (one read of the matrix: row
    norms, then an exact look at the rows whose norm is not finite)."""
    return ~row_norms(x)[1]


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite. A finite sum says so at the cost of
    one sum (a bool mask costs ~10x that on CPU); a sum that overflows is checked
    value by value."""
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def clip_scales(norms: torch.Tensor, radius: torch.Tensor | float) -> torch.Tensor:
    """Per-row factors ``min(1, radius / ||x_i||)`` (1 for zero rows)."""
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.clamp(radius / safe, max=1.0)


# -------------------------------------------------------------------- geometry

def _symmetric(m: torch.Tensor) -> torch.Tensor:
    """``m`` with its lower triangle the mirror of its upper one. Entries ``ij``
    and ``ji`` round differently (products taken in another order), and the
    documented tie-breaks (lowest index) need exact ties to be ties: with one
    neighbour, as Bulyan's last Krum picks take, two mutual nearest rows score
    the same distance, and which one won depended on that rounding (and on how
    the Gram sums were split among aggregation ranks)."""
    return torch.triu(m).add_(torch.triu(m, 1).T)

class Geometry:
    """Pairwise quantities of ``n`` rows known only through a :class:`Frame`.

    ``scale`` (optional, ``[n]``) describes the rows ``s_i x_i`` instead of
    ``x_i``; in a centred frame that needs its origin point (``s_i x_i`` is the
    affine combination ``s_i x_i + (1 - s_i) 0``). ``g`` is the Gram matrix of
    the (scaled) rows relative to the frame's reference: what translation-invariant
    computations (distances, Weiszfeld iterations) read.
    """

    def __init__(self, fr: Frame | torch.Tensor, scale: Optional[torch.Tensor] = None) -> None:
        if isinstance(fr, torch.Tensor):  # a plain Gram matrix
            g0 = fr.to("cpu", torch.float64)
            fr = Frame(g0, g0.shape[0], torch.ones(g0.shape[0], dtype=torch.bool))
        self.frame = fr
        n = self.n = fr.n
        g = fr.g[:n, :n]
        self.scale = None if scale is None else scale.to("cpu", torch.float64)
        if self.scale is not None:
            s = self.scale
            if fr.centred:
                o = fr.o
                t = 1.0 - s
                go = fr.g[:n, o]
                g = (g * s[:, None] * s[None, :] + (s * go)[:, None] * t[None, :] + t[:, None] * (s * go)[None, :]
                     + fr.g[o, o] * t[:, None] * t[None, :])
            else:
                g = g * s[:, None] * s[None, :]
        self.g = g

    @functools.cached_property
    def sq_norms(self) -> torch.Tensor:
        sq = self.frame.sq_norms()
        return sq if self.scale is None else sq * self.scale * self.scale

    @property
    def norms(self) -> torch.Tensor:
        return self.sq_norms.sqrt()

    def sq_euclidean(self) -> torch.Tensor:
        d = _symmetric(_sq_dist(self.g))
        d.fill_diagonal_(0.0)
        return d

    def euclidean(self) -> torch.Tensor:
        return self.sq_euclidean().sqrt_()

    def cosine_similarity(self) -> torch.Tensor:
        dots = self.frame.dots()
        if self.scale is not None:
            dots = dots * self.scale[:, None] * self.scale[None, :]
        norms = self.norms
        inv = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
        return _symmetric((dots * inv[:, None] * inv[None, :]).clamp_(-1.0, 1.0))

    def cosine_distance(self) -> torch.Tensor:
        d = 1.0 - self.cosine_similarity()
        d.fill_diagonal_(0.0)
        return d

    def dissimilarity(self, kind: str) -> torch.Tensor:
        """The matrix a distance-based rule ranks by: squared Euclidean (Krum's
        score, Blanchard et al.) or the cosine distance ``1 - cos`` that the
        Layerwise Cosine paper substitutes for it."""
        if kind == "euclidean":
            return self.sq_euclidean()
        if kind == "cosine":
            return self.cosine_distance()
        raise DefenseError(f"unknown distance {kind!r}; use one of {', '.join(DISTANCES)}")
