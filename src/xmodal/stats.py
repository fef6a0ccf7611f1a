"""Inference for subset alignment: random-subset baseline and a stimulus bootstrap of low − high.

Bootstrap scheme (resample stimuli with replacement within each set, independently for the low
and the high set; percentile interval of CKNNA(low*) − CKNNA(high*)). A resample is a multiset
with multiplicities w_i (Σ w_i = n). Duplicated rows would otherwise create exact kernel ties and
self-neighbours (a copy of i is i's most similar "other" stimulus). We treat copies of one
stimulus as the same point: copies are never each other's neighbours and pairs of copies are
excluded from the U-statistic, exactly like the diagonal (the standard multinomial-weight
bootstrap of a U-statistic). Among the copies of a neighbour j, ties are broken by copy order
(the same rule for K and L), so copy-level kNN sets reduce to counts n_ij = number of copies of j
among the k nearest copies of i, and with nM_ij = min(nK_ij, nL_ij):

  Σ_ab A B (transpose term) = Σ_ij nM_ij nM_ji K_ij L_ij,  1ᵀA1 = Σ_i w_i Σ_j nM_ij K_ij,
  1ᵀAB1 = Σ_j (Σ_i w_i nM_ij K_ij)(Σ_l nM_jl L_jl),  m = Σ_i w_i.

With all w_i = 1 this is exactly CKNNA on the set. Only the first T entries of each row's sorted
neighbour list are needed (T doubles, up to n − 1, if a resample ever needs more), so a resample
costs O(n·T) instead of O(n²) and no resampled kernel is ever materialised; the cross term of
two kernels visits only the entries (i, j) of L's lists with j also in K's list of i (nM_ij = 0
elsewhere). Lists are sorted by (value descending, stimulus order ascending), the tie rule of
docs/method.md; reciprocal entries are found by comparing against the short lists, so no n×n
array is needed either (the lists of a large set can be computed from its features by row
blocks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from xmodal.intervals import percentile_interval
from xmodal.io import atomic_path
from xmodal.metrics import feature_tensor, kernel_row_blocks, normalised_hsic, top_lists

__all__ = [
    "BootstrapPlan",
    "BootstrapSide",
    "difference_summary",
    "bootstrap_cknna",
    "bootstrap_difference",
    "random_baseline",
    "load_sides",
    "save_sides",
    "weighted_cknna",
]


def random_baseline(
    random_values: np.ndarray, low_value: float, level: float = 0.95
) -> dict[str, float]:
    """Random-draw distribution: mean, percentile interval, fraction of draws ≥ the low set's score.

    Refuses undefined inputs rather than ignoring them: mean, interval and fraction are NaN
    when any draw is not finite (``n_nonfinite`` says how many), and the fraction is NaN when
    the low set's score is not finite.
    """
    v = np.asarray(random_values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError("random_values must be a non-empty 1-D array")
    n_bad = int(np.sum(~np.isfinite(v)))
    lo, hi = percentile_interval(v, level)
    nan = float("nan")
    return {
        "random_mean": float(v.mean()) if n_bad == 0 else nan,
        "random_ci_low": lo,
        "random_ci_high": hi,
        "frac_random_ge_low": (
            float(np.mean(v >= low_value)) if n_bad == 0 and np.isfinite(low_value) else nan
        ),
        "n_nonfinite": n_bad,
    }


@dataclass
class BootstrapSide:
    """One kernel on a set, for a plan's resamples: sorted neighbour lists (n, T) and self-HSIC (B,).

    ``order``/``values``: each row's T nearest other stimuli of the set (local positions) and
    their kernel values, sorted by (value descending, position ascending); ``rec``: for entry
    (i, t) with j = order[i, t], the flat index j·(T+1) + t' of (j, i) in a (n, T+1) padded
    layout (t' = T when i is not in j's list); ``counts`` (n, T, B), stimulus-major so that
    gathers and sums over list entries move rows of resamples, are kept when small, else
    recomputed per block of resamples.
    """

    order: torch.Tensor
    values: torch.Tensor
    rec: torch.Tensor
    self_hsic: torch.Tensor
    counts: torch.Tensor | None = None

    @property
    def depth(self) -> int:
        """Number of neighbours kept per row (T)."""
        return int(self.order.shape[1])


def _list_positions(lists: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Position t with lists[rows[q], t] == cols[q], or T (the list length) where cols[q] is absent.

    Chunked comparisons against the (short) lists: O(chunk·T) memory, no n×n position matrix.
    """
    t = lists.shape[1]
    out = torch.empty(rows.shape, dtype=torch.long)
    step = max(1, _CHUNK // max(t, 1))
    for start in range(0, rows.numel(), step):
        eq = lists.index_select(0, rows[start : start + step]) == cols[start : start + step, None]
        pos = eq.to(torch.uint8).argmax(dim=1)
        out[start : start + step] = torch.where(eq.any(dim=1), pos, t)
    return out


def _counts(order: torch.Tensor, weights: torch.Tensor, k: int) -> tuple[torch.Tensor, bool]:
    """n_ij on sorted lists, (n, T, B): copies of j among the k nearest copies of i; and whether
    T sufficed. ``weights`` (n, B): the multiplicities of a block of resamples, stimulus-major."""
    n, t = order.shape
    bsz = weights.shape[1]
    wi = weights.to(torch.int16 if n < 32000 else torch.int32)
    wo = wi.index_select(0, order.reshape(-1)).view(n, t, bsz)  # rows of B: a fast gather
    # j's copies fill places (c_{t−1}, c_t] of the multiset list (c: cumulative copies), so
    # min(c_t, k) − min(c_{t−1}, k) of them are among the first k
    cum = wo.cumsum(dim=1, dtype=wi.dtype).clamp_(max=k)
    enough = bool(((cum[:, -1, :] == k) | (wi == 0)).all())
    return torch.diff(cum, dim=1, prepend=cum.new_zeros(n, 1, bsz)), enough


#: Resamples evaluated together: each (block, n, T) temporary then stays cache-sized. At n = 256,
#: T ≈ 31 a CKNNA of 1000 resamples took 34 ms in blocks of 128 and 91 ms in one block.
BLOCK = 128
#: Counts (n_boot·n·T elements) kept with a side when at most this many, else recomputed per block.
KEEP_COUNTS = 1 << 25
_CHUNK = 1 << 24


def _blocks(n_boot: int) -> list[slice]:
    return [slice(s, min(s + BLOCK, n_boot)) for s in range(0, n_boot, BLOCK)]


def _entry_index(
    order: torch.Tensor, rec: torch.Tensor, e: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row i, column j and the reciprocal entry (j, i)'s position among ``e`` (len(e) when it is
    not among them) of the entries ``e`` (flat indices into the (n, T) lists ``order``; ``rec``
    as in :class:`BootstrapSide`)."""
    n, t = order.shape
    p = int(e.numel())
    e_row = torch.div(e, t, rounding_mode="floor")
    e_col = order.reshape(-1).index_select(0, e)
    r = rec.reshape(-1).index_select(0, e)
    back = r % (t + 1)
    flat = torch.div(r, t + 1, rounding_mode="floor") * t + back.clamp(max=t - 1)
    where = torch.full((n * t,), p, dtype=torch.long)
    where[e] = torch.arange(p)
    return e_row, e_col, torch.where(back < t, where.index_select(0, flat), p)


def _entry_hsic(
    w: torch.Tensor,
    n_m: torch.Tensor,
    e_row: torch.Tensor,
    e_col: torch.Tensor,
    e_rec: torch.Tensor,
    a_e: torch.Tensor,
    b_e: torch.Tensor,
) -> torch.Tensor:
    """Weighted HSIC_u (B,) of the module docstring over list entries (i, j) = (e_row, e_col)
    with counts n_m (P, B), kernel values a_e, b_e (P,) and the reciprocal entry's position
    e_rec (P: none); entries not given have count 0. ``w`` (n, B): multiplicities."""
    n, bsz = w.shape
    f64 = torch.float64
    n_rec = torch.cat([n_m, n_m.new_zeros(1, bsz)]).index_select(0, e_rec)
    term1 = (n_rec * n_m * (a_e * b_e)[:, None]).to(f64).sum(dim=0)
    na = n_m * a_e[:, None]
    # short sums per stimulus in the working dtype, then float64 over stimuli
    row_a = n_m.new_zeros(n, bsz).index_add_(0, e_row, na).to(f64)
    row_b = n_m.new_zeros(n, bsz).index_add_(0, e_row, n_m * b_e[:, None]).to(f64)
    w64 = w.to(f64)
    sum_a = (w64 * row_a).sum(dim=0)
    sum_b = (w64 * row_b).sum(dim=0)
    col_a = n_m.new_zeros(n, bsz).index_add_(0, e_col, na * w.index_select(0, e_row))
    ab = (col_a.to(f64) * row_b).sum(dim=0)
    return _combine(term1, sum_a, sum_b, ab, w64)


def _combine(
    term1: torch.Tensor,
    sum_a: torch.Tensor,
    sum_b: torch.Tensor,
    ab: torch.Tensor,
    w64: torch.Tensor,
) -> torch.Tensor:
    """HSIC_u (B,) from its three terms' sums (module docstring), m = Σ_i w_i per resample."""
    m = w64.sum(dim=0)
    return (term1 + sum_a * sum_b / ((m - 1) * (m - 2)) - 2.0 * ab / (m - 2)) / (m * (m - 3))


def _self_hsic(
    w: torch.Tensor, counts: torch.Tensor, e_col: torch.Tensor, e_rec: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """:func:`_entry_hsic` of a side with itself over every list entry: ``counts`` (n, T, B)
    and kernel values ``v`` (n·T,) row-major, so per-stimulus sums are sums over T and the
    two kernels' row sums are one."""
    n, t, bsz = counts.shape
    f64 = torch.float64
    n_m = counts.reshape(n * t, bsz)
    n_rec = torch.cat([n_m, n_m.new_zeros(1, bsz)]).index_select(0, e_rec)
    term1 = (n_rec * n_m * (v * v)[:, None]).to(f64).sum(dim=0)
    na = (n_m * v[:, None]).view(n, t, bsz)
    row = na.sum(dim=1).to(f64)  # short sums per stimulus in the working dtype
    w64 = w.to(f64)
    sum_a = (w64 * row).sum(dim=0)
    col = n_m.new_zeros(n, bsz).index_add_(0, e_col, (na * w[:, None, :]).view(n * t, bsz))
    ab = (col.to(f64) * row).sum(dim=0)
    return _combine(term1, sum_a, sum_a, ab, w64)


class BootstrapPlan:
    """Resamples (with replacement) of one stimulus set, shared by every kernel evaluated on it.

    ``weights`` (n_boot, n) are multiplicities of the set's stimuli in ascending stimulus order
    (``positions`` is kept sorted, so that ties break by stimulus order as everywhere else).
    The draws ``rng.integers(0, n, (n_boot, n))`` index the sorted positions, so the resamples
    depend on which stimuli the set holds, not on the order it lists them in (a set listed by
    dispersion rank would otherwise get other intervals when rounding swaps two near-equal
    dispersions).
    ``side(kernel)`` or ``side(features=x)`` prepares one kernel restricted to the set,
    ``cknna(side_x, side_y)`` gives the n_boot resampled CKNNA values.
    """

    def __init__(
        self, positions: np.ndarray, n_boot: int, rng: np.random.Generator, k: int = 10
    ) -> None:
        given = np.asarray(positions, dtype=np.int64)
        n = int(given.size)
        if n < 4 or not 1 <= k <= n - 1:
            raise ValueError(f"need a set of n ≥ 4 stimuli and 1 ≤ k ≤ n−1, got n={n}, k={k}")
        if n_boot < 1:
            raise ValueError(f"n_boot must be ≥ 1, got {n_boot}")
        self.n, self.k, self.n_boot = n, k, int(n_boot)
        draws = rng.integers(0, n, size=(n_boot, n))
        # multiplicities per resample: counts of (resample, stimulus) over the flat draws
        flat = (draws + n * np.arange(n_boot)[:, None]).ravel()
        weights = np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float32)
        self.positions = torch.from_numpy(np.sort(given, kind="stable"))
        self.weights = torch.from_numpy(weights)
        self._digest: bytes | None = None
        self._by_stimulus: torch.Tensor | None = None

    @classmethod
    def from_weights(cls, positions: np.ndarray, weights: np.ndarray, k: int = 10) -> BootstrapPlan:
        """A plan with given integer multiplicities (n_boot, n) instead of random draws; column j
        of ``weights`` is the multiplicity of ``positions[j]``, in the order given."""
        plan = cls.__new__(cls)
        given = np.asarray(positions, dtype=np.int64)
        plan.n = int(given.size)
        plan.k = k
        w = np.asarray(weights, dtype=np.float32)
        if w.ndim != 2 or w.shape[1] != plan.n:
            raise ValueError(f"weights must be (n_boot, {plan.n}), got {w.shape}")
        order = np.argsort(given, kind="stable")
        plan.positions = torch.from_numpy(given[order])
        plan.weights = torch.from_numpy(np.ascontiguousarray(w[:, order]))
        plan.n_boot = int(w.shape[0])
        plan._digest = None
        plan._by_stimulus = None
        return plan

    def _weights(self, dtype: torch.dtype) -> torch.Tensor:
        """The multiplicities stimulus-major, (n, n_boot), in ``dtype``."""
        if self._by_stimulus is None:
            self._by_stimulus = self.weights.T.contiguous()
        return self._by_stimulus.to(dtype)

    def _lists(
        self, sub: torch.Tensor | None, x: torch.Tensor | None, depth: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted top-``depth`` lists within the set, from its kernel or, blocked, its features."""
        if sub is not None:
            masked = sub.clone()
            masked.fill_diagonal_(float("-inf"))
            val, idx, _ = top_lists(masked, depth)
            return idx, val
        parts = [top_lists(rows, depth)[:2] for _, rows in kernel_row_blocks(x)]
        return torch.cat([p[1] for p in parts]), torch.cat([p[0] for p in parts])

    def key(self, source: torch.Tensor) -> str:
        """Content key of the side this plan prepares from ``source`` (the set's kernel or
        feature rows): equal keys mean equal sides (same resamples, k and input bytes)."""
        if self._digest is None:
            h = hashlib.sha256(f"{_SIDE_FORMAT}|k={self.k}|B={self.n_boot}|n={self.n}".encode())
            h.update(self.positions.numpy().tobytes())
            h.update(self.weights.numpy().tobytes())
            self._digest = h.digest()
        h = hashlib.sha256(self._digest)
        h.update(f"{source.dtype}|{tuple(source.shape)}".encode())
        h.update(source.contiguous().numpy().tobytes())
        return h.hexdigest()

    def side(
        self,
        kernel: np.ndarray | torch.Tensor | None = None,
        full_kernel: bool = True,
        features: np.ndarray | torch.Tensor | None = None,
        cache: MutableMapping[str, BootstrapSide] | None = None,
    ) -> BootstrapSide:
        """Neighbour lists and self-HSIC of a kernel on the set.

        ``kernel``: the full m×m kernel (or, with ``full_kernel=False``, the set's n×n one);
        ``features``: the full (m, p) features instead, for the blocked path (no n×n kernel).
        ``cache`` (by :meth:`key`, e.g. from :func:`load_sides`): a side prepared before from
        the same input bytes and resamples is taken from it, a new one is added to it.
        """
        if (kernel is None) == (features is None):
            raise ValueError("give exactly one of kernel and features")
        sub = x = None
        if kernel is not None:
            kt = torch.as_tensor(kernel).cpu()
            pos = self.positions
            sub = kt.index_select(0, pos).index_select(1, pos) if full_kernel else kt
            sub = sub.to(torch.float32) if sub.dtype != torch.float64 else sub
            dtype = sub.dtype
        else:
            x = feature_tensor(features).cpu().index_select(0, self.positions)
            dtype = x.dtype
        key = self.key(sub if sub is not None else x) if cache is not None else ""
        if cache is not None and key in cache:
            return self._with_counts(cache[key])
        side = self._build(sub, x, dtype)
        if cache is not None:
            cache[key] = side
        return side

    def _block_counts(self, order: torch.Tensor, b: slice, dtype: torch.dtype) -> torch.Tensor:
        """Counts (n, T, len(b)) of the resamples ``b`` on the lists ``order``, in ``dtype``."""
        return _counts(order, self._weights(dtype)[:, b], self.k)[0].to(dtype)

    def _with_counts(self, side: BootstrapSide) -> BootstrapSide:
        """``side`` with its counts, recomputed from its lists when small enough to keep."""
        n, t = side.order.shape
        if side.counts is not None or self.n_boot * n * t > KEEP_COUNTS:
            return side
        dtype = side.values.dtype
        counts = [self._block_counts(side.order, b, dtype) for b in _blocks(self.n_boot)]
        return dataclasses.replace(side, counts=torch.cat(counts, dim=2))

    def _build(
        self, sub: torch.Tensor | None, x: torch.Tensor | None, dtype: torch.dtype
    ) -> BootstrapSide:
        """Lists, reciprocal positions, self-HSIC and (when small) counts of the set's kernel
        ``sub`` or feature rows ``x``."""
        weights = self._weights(dtype)
        depth = min(self.n - 1, 4 * self.k + 8)
        while True:  # deepen until every resample finds k copies in every row's list
            order, values = self._lists(sub, x, depth)
            keep = self.n_boot * self.n * depth <= KEEP_COUNTS
            enough, used, counts = True, 0, []
            for b in _blocks(self.n_boot):
                cnt, ok = _counts(order, weights[:, b], self.k)
                enough &= ok
                hit = torch.nonzero(cnt.amax(dim=2).amax(dim=0))
                used = max(used, int(hit.max()) + 1 if hit.numel() else 1)
                if keep:
                    counts.append(cnt)
            if enough or depth == self.n - 1:
                break
            depth = min(self.n - 1, 2 * depth)
        # keep only the list prefix that carries any count
        t = used
        order, values = order[:, :t].contiguous(), values[:, :t].contiguous()
        rows = torch.arange(self.n).view(-1, 1).expand(self.n, t).reshape(-1)
        pos = _list_positions(order, order.reshape(-1), rows)
        rec = (order.reshape(-1) * (t + 1) + pos).view(self.n, t)
        _, e_col, e_rec = _entry_index(order, rec, torch.arange(self.n * t))
        v = values.reshape(-1)
        # kept counts: each block's list prefix converted straight into one (n, T, n_boot) array
        kept = torch.empty((self.n, t, self.n_boot), dtype=dtype) if keep else None
        self_h = []
        for i, b in enumerate(_blocks(self.n_boot)):
            if kept is not None:
                cnt = kept[:, :, b]
                cnt.copy_(counts[i][:, :t])
                counts[i] = None  # the block's int16 counts are no longer needed
            else:
                cnt = self._block_counts(order, b, dtype)
            self_h.append(_self_hsic(weights[:, b], cnt, e_col, e_rec, v))
        return BootstrapSide(order, values, rec, torch.cat(self_h), kept)

    def _side_counts(self, side: BootstrapSide, b: slice, dtype: torch.dtype) -> torch.Tensor:
        """Counts of the resamples ``b``, (n·T, len(b))."""
        n, t = side.order.shape
        if side.counts is not None:
            return side.counts[:, :, b].reshape(n * t, -1)
        return self._block_counts(side.order, b, dtype).view(n * t, -1)

    def cknna(self, kside: BootstrapSide, lside: BootstrapSide) -> np.ndarray:
        """Resampled CKNNA values (n_boot,) for two prepared sides of the same plan."""
        return self.values(kside, lside, "cknna")

    def values(self, kside: BootstrapSide, lside: BootstrapSide, metric: str) -> np.ndarray:
        """Resampled ``cknna`` or ``mutual_knn`` values (n_boot,) for two sides of this plan.

        Multiset mutual kNN = Σ_i w_i Σ_j nM_ij / (k·Σ_i w_i) with the counts nM of the module
        docstring (copies of a stimulus are one point, as for CKNNA).
        """
        if metric not in ("cknna", "mutual_knn"):
            raise ValueError(f"the bootstrap covers cknna and mutual_knn, not {metric!r}")
        n, t = lside.order.shape
        t_k = kside.depth
        dtype = lside.values.dtype
        f64 = torch.float64
        rows = torch.arange(n).view(-1, 1).expand(n, t).reshape(-1)
        # where L's neighbour j of i sits in K's list of i (T_K when absent, count 0 there)
        k_pos = _list_positions(kside.order, rows, lside.order.reshape(-1))
        # nM_ij > 0 needs j in both lists of i: only those entries e of L's lists are visited
        e = torch.nonzero(k_pos < t_k).squeeze(1)
        e_row, e_col, e_rec = _entry_index(lside.order, lside.rec, e)
        k_flat = e_row * t_k + k_pos.index_select(0, e)
        a_e = kside.values.to(dtype).reshape(-1).index_select(0, k_flat)
        b_e = lside.values.reshape(-1).index_select(0, e)
        weights = self._weights(dtype)
        out = np.empty(self.n_boot, dtype=np.float64)
        for b in _blocks(self.n_boot):
            c_l = self._side_counts(lside, b, dtype).index_select(0, e)
            c_k = self._side_counts(kside, b, dtype).index_select(0, k_flat)
            n_m = torch.minimum(c_l, c_k)  # (visited entries, B)
            w = weights[:, b]
            if metric == "mutual_knn":
                hits = (w.index_select(0, e_row) * n_m).to(f64).sum(dim=0)
                out[b] = (hits / (self.k * w.to(f64).sum(dim=0))).numpy()
                continue
            cross = _entry_hsic(w, n_m, e_row, e_col, e_rec, a_e, b_e)
            out[b] = normalised_hsic(cross, kside.self_hsic[b], lside.self_hsic[b]).numpy()
        return out


#: version of the stored sides (:func:`save_sides`); part of every key, so that sides stored by
#: another version of the preparation are never taken (2: self-HSIC summed per stimulus over
#: the lists, equal to version 1's to about 1e-10 relative, not bit for bit)
_SIDE_FORMAT = "bootstrap-side-2"
_SIDE_FIELDS = ("order", "values", "rec", "self_hsic")


def _sides_digest(sides: Mapping[str, Mapping[str, Any]]) -> str:
    """SHA-256 of stored sides' tensors (keys, fields, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for key in sorted(sides):
        for name in _SIDE_FIELDS:
            t = sides[key][name]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"side {key!r}: field {name!r} is not a tensor")
            a = t.detach().cpu().contiguous()
            h.update(f"{key}\0{name}\0{a.dtype}\0{tuple(a.shape)}\0".encode())
            h.update(a.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
    return h.hexdigest()


def save_sides(sides: Mapping[str, BootstrapSide], path: str | os.PathLike) -> None:
    """Write prepared sides (by :meth:`BootstrapPlan.key`), without their counts, atomically,
    with the SHA-256 of their tensors, which :func:`load_sides` checks."""
    stored = {key: {f: getattr(side, f) for f in _SIDE_FIELDS} for key, side in sides.items()}
    payload = {"format": _SIDE_FORMAT, "sides": stored, "sha256": _sides_digest(stored)}
    with atomic_path(path, suffix=".pt") as tmp, open(tmp, "wb") as fh:
        # to an open file: saved to a path, the zip's record names would hold the temporary
        # file's random name, and equal sides would give files that differ
        torch.save(payload, fh)


def load_sides(path: str | os.PathLike) -> dict[str, BootstrapSide]:
    """The sides written by :func:`save_sides` (tensors only: nothing in the file is executed)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt or not a torch file: torch says which
        raise ValueError(
            f"{path}: cannot read the prepared bootstrap sides ({type(err).__name__}: {err}); "
            "delete it and rerun (rule vision_bootstrap remakes it)"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != _SIDE_FORMAT:
        raise ValueError(
            f"{path}: not a file of prepared bootstrap sides of format {_SIDE_FORMAT!r} "
            "(written by another version: rerun the rule that made it)"
        )
    # bytes damaged on disk (4 flipped bits moved intervals, exit 0; audit); a file written
    # before the digest was stored has none
    told = payload.get("sha256")
    if told is not None:
        try:
            got = _sides_digest(payload["sides"])
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            got = f"unreadable ({err})"
        if got != told:
            raise ValueError(
                f"{path}: the prepared bootstrap sides are damaged (their SHA-256 differs from "
                "the one stored with them); delete it and rerun (rule vision_bootstrap remakes it)"
            )
    return {key: BootstrapSide(**parts) for key, parts in payload["sides"].items()}


def weighted_cknna(
    kernel_x: np.ndarray, kernel_y: np.ndarray, weights: np.ndarray, k: int = 10
) -> np.ndarray:
    """CKNNA of multisets of the stimuli with integer multiplicities ``weights`` (B, m): (B,)."""
    kx = torch.as_tensor(np.asarray(kernel_x))
    plan = BootstrapPlan.from_weights(np.arange(kx.shape[0]), weights, k)
    return plan.cknna(plan.side(kx), plan.side(np.asarray(kernel_y)))


def bootstrap_cknna(
    kernel_x: np.ndarray | torch.Tensor,
    kernel_y: np.ndarray | torch.Tensor,
    positions: np.ndarray,
    n_boot: int,
    rng: np.random.Generator,
    k: int = 10,
) -> np.ndarray:
    """n_boot CKNNA values of stimulus resamples (with replacement) of the set ``positions``."""
    plan = BootstrapPlan(positions, n_boot, rng, k)
    return plan.cknna(plan.side(kernel_x), plan.side(kernel_y))


def bootstrap_difference(
    kernel_x: np.ndarray | torch.Tensor,
    kernel_y: np.ndarray | torch.Tensor,
    low: np.ndarray,
    high: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    k: int = 10,
    level: float = 0.95,
) -> dict[str, float]:
    """Percentile interval of CKNNA(low*) − CKNNA(high*), resampling stimuli within each set.

    Conservative: about 1.1–1.5 times as wide as the spread of low − high over fresh sets
    (``benchmarks/difference_calibration.py``; docs/method.md, "Layer choice and statistics").
    """
    rng = np.random.default_rng(seed)
    diffs = bootstrap_cknna(kernel_x, kernel_y, low, n_boot, rng, k) - bootstrap_cknna(
        kernel_x, kernel_y, high, n_boot, rng, k
    )
    return difference_summary(diffs, level)


def difference_summary(diffs: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """diff_ci_low, diff_ci_high (percentile interval), n_boot, bootstrap SD and n_nonfinite.

    Interval and SD are NaN when any resampled difference is not finite.
    """
    d = np.asarray(diffs, dtype=np.float64)
    lo, hi = percentile_interval(d, level)
    n_bad = int(np.sum(~np.isfinite(d)))
    sd = float(np.std(d, ddof=1)) if d.size > 1 and n_bad == 0 else float("nan")
    return {
        "diff_ci_low": lo,
        "diff_ci_high": hi,
        "n_boot": int(d.size),
        "boot_sd": sd,
        "n_nonfinite": n_bad,
    }
