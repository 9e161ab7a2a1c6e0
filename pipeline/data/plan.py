"""Shard plan: a pure function from file metadata to a table of corpus pieces."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from pipeline.errors import InputError

DEFAULT_COLUMNS = ("id", "embedding")


@dataclass(frozen=True)
class Shard:
    shard_id: int
    uri: str
    start: int  # first row in the file
    stop: int  # one past the last row
    id_offset: int  # ids of files without an integer id column: id_offset + row
    fingerprint: str = ""  # the file's size and version (ETag or mtime): changes with content
    id_column: str = "id"  # Parquet's columns (data.id_column, data.embedding_column)
    embedding_column: str = "embedding"

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def columns(self) -> tuple[str, str]:
        return self.id_column, self.embedding_column

    @property
    def key(self) -> str:
        """Names this shard's encoded outputs: the same rows of the same file version under the
        same ids give the same key, so unchanged shards are never encoded twice."""
        raw = f"{self.uri}|{self.start}|{self.stop}|{self.id_offset}|{self.fingerprint}"
        if self.columns != DEFAULT_COLUMNS:
            raw += "|" + "|".join(self.columns)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)


def plan_shards(files: list[tuple], rows_per_shard: int,
                columns: tuple[str, str] = DEFAULT_COLUMNS) -> list[Shard]:
    """Splits files (uri, rows[, fingerprint]) into shards of at most `rows_per_shard` rows.

    Each shard lies within one file; files with zero rows get no shard. Shards cover every row
    exactly once, in file order.
    """
    if rows_per_shard < 1:
        raise InputError("data.rows_per_shard must be >= 1")
    shards: list[Shard] = []
    offset = 0
    for uri, rows, *fp in files:
        n_pieces = -(-rows // rows_per_shard)
        for p in range(n_pieces):
            # Even split keeps shards balanced instead of leaving one small tail.
            start, stop = rows * p // n_pieces, rows * (p + 1) // n_pieces
            shards.append(Shard(len(shards), uri, start, stop, offset, *(fp or [""]),
                                *columns))
        offset += rows
    return shards



def first_rows(files: list[tuple], limit: int) -> list[tuple]:
    """Files (uri, rows[, fingerprint]) cut to their first `limit` rows in all (0: all)."""
    kept, left = [], limit or sum(f[1] for f in files)
    for uri, rows, *fp in files:
        if left <= 0:
            break
        kept.append((uri, min(rows, left), *fp))
        left -= rows
    return kept


def plan_blocks(files: list[tuple], block: int, limit: int = 0,
                columns: tuple[str, str] = DEFAULT_COLUMNS) -> list[Shard]:
    """Query blocks: the first `limit` rows (all when 0) of files (uri, rows[, fingerprint]),
    split as plan_shards splits a corpus. Ids of files without an id column continue from
    file to file, as for the corpus, so a query's id does not depend on the block size."""
    return plan_shards(first_rows(files, limit), block, columns)
