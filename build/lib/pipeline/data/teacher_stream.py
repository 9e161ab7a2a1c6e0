"""The teacher's training parts as disjoint streams, so that each training worker reads only
its own share of the data and every global batch is the same whatever the worker count.

The training rows (the parts in order, each part's rows in order) are cut into S contiguous
spans of about N/S rows (S = train.streams). Worker r of W reads the spans s with s % W == r,
about N/W rows, and nothing else. At every step each span gives B/S rows (after a seeded shuffle
within a buffer of its own), and the global batch is their union in span order; a worker's
local batch is the union of its spans' pieces. One worker reading all S spans therefore takes
exactly the steps that W workers take together, up to the order of the gradient sum.

Parts are read by row group (pipeline.data.teacher_parts writes small ones), so a span costs
its own rows plus at most a row group at each end.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.teacher_parts import table_arrays
from pipeline.errors import InputError


class _Parts:
    """Rows [a, b) of the concatenated parts, read row group by row group."""

    def __init__(self, uris: list[str]):
        self.uris = uris
        self.groups = []  # (part, row group, first global row, rows)
        start = 0
        for p, uri in enumerate(uris):
            with storage.open_ranged(uri) as f:
                meta = pq.ParquetFile(f).metadata
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                self.groups.append((p, g, start, n))
                start += n
        self.rows = start
        self.bytes_read = self.rows_read = 0  # what was fetched: whole row groups

    def read(self, a: int, b: int, cache: dict, keep: int, columns=("xq", "V")) -> dict:
        """Rows [a, b). `cache` (one per worker: {(part, group): table}) keeps the `keep`
        newest row groups."""
        chunks = []
        for p, g, first, n in self.groups:
            if first + n <= a or first >= b:
                continue
            table = self._group(p, g, cache, keep, columns)
            lo, hi = max(a, first) - first, min(b, first + n) - first
            chunks.append(table_arrays(table.slice(lo, hi - lo), columns))
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    def _group(self, p: int, g: int, cache: dict, keep: int, columns):
        """One row group, fetched once: each span reads its rows in order in chunks smaller
        than a group, and two neighbouring spans of one worker share the group between
        them. The cache keeps the two newest groups per span."""
        if (p, g) not in cache:
            with storage.open_ranged(self.uris[p]) as f:
                pf = pq.ParquetFile(f)
                meta = pf.metadata.row_group(g)
                self.bytes_read += sum(meta.column(c).total_compressed_size
                                       for c in range(meta.num_columns)
                                       if meta.column(c).path_in_schema.split(".")[0] in columns)
                self.rows_read += meta.num_rows
                cache[(p, g)] = pf.read_row_group(g, columns=list(columns))
            while len(cache) > keep:
                del cache[next(iter(cache))]  # the oldest
        return cache[(p, g)]


class TeacherStream:
    """This worker's spans of the training parts, in the interface of
    pipeline.quant.loop.TrainData (`pool`, `steps(B)`, `batches(B, seed, epoch)`).

    `gather(xq_local)` returns the global batch's queries from every worker's local ones, in
    rank order (an all-gather); with one worker it is not called. The IVF negative sampler
    draws from the lists of the global batch's queries."""

    def __init__(self, uris: list[str], pool: np.ndarray, streams: int, rank: int = 0,
                 world: int = 1, shuffle_rows: int = 0,
                 gather: Callable[[np.ndarray], list[np.ndarray]] | None = None):
        if streams % world:
            raise InputError(f"train.streams ({streams}) must be a multiple of "
                             f"ray.train_workers ({world})")
        self.parts = _Parts(uris)
        self.pool, self.streams, self.rank, self.world = pool, streams, rank, world
        self.shuffle_rows, self.gather = shuffle_rows, gather
        n = self.parts.rows
        self.spans = [(s * n // streams, (s + 1) * n // streams) for s in range(streams)]
        self.mine = [s for s in range(streams) if s % world == rank]
        self._cache = {}

    @property
    def bytes_read(self) -> int:
        return self.parts.bytes_read

    @property
    def rows_read(self) -> int:
        return self.parts.rows_read

    def steps(self, batch_size: int) -> int:
        per = batch_size // self.streams
        return min((b - a) // per for a, b in self.spans)

    def _span(self, s: int, per: int, seed: int, epoch: int):
        """Pieces of `per` rows of span s, shuffled within buffers of about shuffle_rows / S
        rows (seeded by span and epoch: the same whichever worker reads it)."""
        a, b = self.spans[s]
        buf = max(per, self.shuffle_rows // self.streams)
        queue = None
        for i, c0 in enumerate(range(a, b, buf)):
            chunk = self.parts.read(c0, min(c0 + buf, b), self._cache, 2 * len(self.mine))
            if self.shuffle_rows:
                order = np.random.default_rng([seed, epoch, s, i]).permutation(len(chunk["xq"]))
                chunk = {k: v[order] for k, v in chunk.items()}
            queue = chunk if queue is None else {k: np.concatenate([queue[k], chunk[k]])
                                                 for k in chunk}
            while len(queue["xq"]) >= per:
                yield {k: v[:per] for k, v in queue.items()}
                queue = {k: v[per:] for k, v in queue.items()}

    def batches(self, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1):
        """(global queries, local queries, local neighbour vectors, None) per step."""
        if batch_size % self.streams:
            raise InputError(f"train.batch_size ({batch_size}) must be a multiple of "
                             f"train.streams ({self.streams})")
        per = batch_size // self.streams
        spans = [self._span(s, per, seed, epoch) for s in self.mine]
        for _ in range(self.steps(batch_size)):
            pieces = [next(it) for it in spans]
            xq = np.concatenate([p["xq"] for p in pieces])
            pos = np.concatenate([p["V"] for p in pieces])
            yield self._global(xq, per), xq, pos, None

    def _global(self, xq: np.ndarray, per: int) -> np.ndarray:
        """The global batch's queries in span order, from every rank's local pieces."""
        if self.world == 1:
            return xq
        by_rank = self.gather(xq)
        spans = [None] * self.streams
        for r, local in enumerate(by_rank):
            for j, s in enumerate(range(r, self.streams, self.world)):
                spans[s] = local[j * per:(j + 1) * per]
        return np.concatenate(spans)
