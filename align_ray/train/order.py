"""The training order: a pure function of (seed, files + row counts, world), with an O(1)
position (epoch, offset) per rank.  ``train/ingest.py``'s docstring says why (exact resume at
any scale, reproducible batches); :class:`DataOrder` says how.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SLICE_ROWS = 1024       # largest slice (the unit of the per-epoch permutation)
MIN_WINDOW_SLICES = 8   # a shuffle window holds at least this many slices (when the data allows)
_U64 = np.uint64


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) % (1 << 64) for k in key]))


def window_order(seed: int, epoch: int, rank: int, window: int, n: int) -> np.ndarray:
    """The seeded permutation of one shuffle window's ``n`` rows."""
    return _rng(seed, 2, epoch, rank, window).permutation(n)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (vectorised, wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        x = x.astype(_U64) + _U64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


def aug_seeds(seed: int, rank: int, epoch: int, offsets: np.ndarray) -> np.ndarray:
    """Per-row augmentation seeds (int64 >= 0) from the row's stream position: a resumed run
    crops and flips every row exactly as the uninterrupted run did."""
    key = _mix64(np.asarray([seed % (1 << 64)], _U64))
    key = _mix64(key ^ _U64(rank % (1 << 64)))
    key = _mix64(key ^ _U64(epoch % (1 << 64)))
    out = _mix64(key ^ np.asarray(offsets).astype(_U64))
    return (out >> _U64(1)).astype(np.int64)


class DataOrder:
    """The order in which one rank reads its training rows, epoch after epoch, for ever.

    * **Slices**: every file is cut into slices of ``slice_rows`` consecutive rows (fewer for a
      small dataset, so that each rank has at least ``MIN_WINDOW_SLICES`` slices per epoch, and
      for a small window, so that a window holds at least that many slices; one row when every
      rank's epoch fits in one window: then the order is uniform sampling without replacement).
    * **Epoch e**: a permutation of all slices seeded by (seed, e): a new file order every epoch.
      Rank r takes slices ``perm[r::world]`` (each rank reads only its own slices: no row is read
      by two ranks, no read amplification).
    * **Windows**: the rank's slices, in that order, are grouped ``window_slices`` at a time; the
      rows of one window are shuffled by a permutation seeded by (seed, e, r, window).  The rows
      of a batch therefore come from ~``window_slices`` different file slices.
    * **Position**: (epoch, offset), offset = rows of the rank's epoch-e stream consumed so far
      (consumed = read, whether kept, skipped as undecodable or not selected).  From it the rest
      of the stream is computed from metadata alone (:meth:`windows`): nothing consumed is read
      or decoded again, except the partly consumed window's rows, which are read (not decoded)
      and dropped.

    * **Resampled** (``resampled=True``, open_clip's ``--dataset-resampled``; None = auto, when
      every rank's epoch fits one window): every epoch is one window per rank, a fresh draw:
      the epoch's slice permutation dealt to the ranks as above, each rank taking its first
      ``window_slices``.  Draws are independent, so a row may come back before others were seen
      once (sampling with replacement across draws, none within a draw, and the ranks of one
      draw share nothing).  When every rank's epoch fits one window (one-row slices) a draw is
      also cut to ``draw_rows`` *selected* rows (``take``: the reader stops after the
      ``take``-th row that the selection keeps), one step's rows of the rank: every global
      batch is then a fresh uniform draw of distinct rows, the plain loop's sampler
      (BENCHMARKS.md "Resampled batches").

    Memory: three small arrays per slice (``rows / slice_rows`` slices: 1.8 B rows -> 1.8 M
    slices, ~30 MB) and one permutation per epoch; never a per-row table."""

    def __init__(self, rows: Any, *, seed: int, world: int, window_rows: int,
                 slice_rows: int = SLICE_ROWS, resampled: bool | None = False,
                 draw_rows: int = 0) -> None:
        rows = np.asarray(rows, np.int64).reshape(-1)
        total = int(rows.sum())
        if total < world:
            raise ValueError(f"the training data has {total} row(s), fewer than the {world} "
                             "workers that each need their own rows")
        S = min(int(slice_rows), total // (world * MIN_WINDOW_SLICES))
        if window_rows >= MIN_WINDOW_SLICES:  # shuffle_buffer 0: whole slices, rows mixed in one
            S = min(S, int(window_rows) // MIN_WINDOW_SLICES)
        fits = total <= world * int(window_rows)
        if fits:
            # every rank's epoch fits in one shuffle window, which reads each row group once
            # whatever the slicing: one-row slices cost nothing more and make each rank's epoch
            # a uniform random share of the rows (uniform sampling without replacement).  With
            # 1/(world x 8) of a file per slice instead, a rank's batches drew from ~8 slices:
            # on a topically sorted file, correlated negatives that fit the dev set measurably
            # more slowly (BENCHMARKS.md "Training quality").
            S = 1
        S = max(1, S)
        n = -(-rows // S)  # slices per file
        self.slice_file = np.repeat(np.arange(len(rows), dtype=np.int32), n)
        first = np.repeat(np.cumsum(n) - n, n)
        self.slice_start = (np.arange(int(n.sum()), dtype=np.int64) - first) * S
        self.slice_len = np.minimum(S, rows[self.slice_file] - self.slice_start)
        self.rows, self.total, self.seed, self.world = rows, total, int(seed), int(world)
        self.slice_rows = S
        self.window_slices = max(1, int(window_rows) // S)
        self.resampled = fits if resampled is None else bool(resampled)  # None: auto
        # rows of a draw the reader keeps (selected rows, ``reader.read_windows``); 0 = all of them
        self.take = int(draw_rows) if self.resampled and fits and draw_rows > 0 else 0
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._perm: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def rank_epoch(self, epoch: int, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the rank's slice ids in epoch order, each slice's first offset + the end offset,
        each window's first offset + the end offset)."""
        key = (int(epoch), int(rank))
        if key not in self._cache:
            if self._perm[0] != epoch:  # one permutation per epoch, shared by the ranks
                perm = _rng(self.seed, 1, epoch).permutation(len(self.slice_len))
                self._perm = (int(epoch), perm)
            mine = self._perm[1][rank::self.world]
            if self.resampled:  # one window per epoch: a fresh draw
                mine = mine[:self.window_slices]
            starts = np.concatenate([[0], np.cumsum(self.slice_len[mine])]).astype(np.int64)
            wstarts = np.concatenate([starts[:-1][::self.window_slices], starts[-1:]])
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = (mine, starts, wstarts)
        return self._cache[key]

    def epoch_rows(self, epoch: int, rank: int) -> int:
        return int(self.rank_epoch(epoch, rank)[1][-1])

    def normalize(self, rank: int, epoch: int, offset: int) -> tuple[int, int]:
        """(epoch, offset) with offset inside the epoch (the end of an epoch = the next one's 0)."""
        while offset >= self.epoch_rows(epoch, rank):
            offset -= self.epoch_rows(epoch, rank)
            epoch += 1
        return int(epoch), int(offset)

    def windows(self, rank: int, epoch: int, offset: int, min_rows: int) -> list[dict]:
        """Read items for the rank's stream from (epoch, offset) on, whole windows (the first one
        from ``offset``), covering at least ``min_rows`` rows."""
        epoch, offset = self.normalize(rank, epoch, offset)
        items: list[dict] = []
        covered = 0
        while covered < max(1, min_rows):
            mine, _, wstarts = self.rank_epoch(epoch, rank)
            w = int(np.searchsorted(wstarts, offset, side="right")) - 1
            while w < len(wstarts) - 1 and covered < max(1, min_rows):
                ids = mine[w * self.window_slices:(w + 1) * self.window_slices]
                items.append({"epoch": epoch, "window": w, "base": int(wstarts[w]),
                              "skip": int(offset - wstarts[w]),
                              "file": self.slice_file[ids].tolist(),
                              "start": self.slice_start[ids].tolist(),
                              "len": self.slice_len[ids].tolist()})
                covered += self.rows_out(int(wstarts[w + 1]) - offset)
                offset = int(wstarts[w + 1])
                w += 1
            epoch, offset = epoch + 1, 0
        return items

    def rows_out(self, n: int) -> int:
        """Rows a window read from an offset emits at most (a resampled draw stops at ``take``)."""
        return min(n, self.take) if self.take else n

    def source_files(self, rank: int, epoch: int, offset: int, n: int) -> np.ndarray:
        """The file index of each of the next ``n`` rows of the rank's stream (metadata only:
        what the reader will emit, before rows are dropped as undecodable/unselected)."""
        out = []
        for it in self.windows(rank, epoch, offset, n):
            src = np.repeat(np.asarray(it["file"], np.int32), it["len"])
            order = window_order(self.seed, it["epoch"], rank, it["window"], len(src))
            end = min(len(src), self.take) if self.take else len(src)  # selection aside
            out.append(src[order[it["skip"]:end]])
        return np.concatenate(out)[:n]


def same_file_fraction(src: np.ndarray) -> float:
    """Fraction of the row pairs of one batch whose rows come from the same file."""
    _, c = np.unique(np.asarray(src), return_counts=True)
    n = int(c.sum())
    return float((c * (c - 1)).sum() / (n * (n - 1))) if n > 1 else 0.0


def uniform_same_file_fraction(rows_per_file: Any) -> float:
    """The same fraction for a batch drawn uniformly from all rows (without replacement, in the
    limit of a large corpus: sum over files of (rows_f / rows)^2)."""
    r = np.asarray(rows_per_file, np.float64)
    return float(((r / r.sum()) ** 2).sum())
