"""Shard plan: a pure function from file metadata to a table of corpus pieces."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Shard:
    shard_id: int
    uri: str
    start: int  # first row in the file
    stop: int  # one past the last row
    id_offset: int  # ids of files without an id column: id_offset + row

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict:
        return asdict(self)


def plan_shards(files: list[tuple[str, int]], rows_per_shard: int) -> list[Shard]:
    """Splits files (uri, rows) into shards of at most `rows_per_shard` rows.

    Each shard lies within one file; files with zero rows get no shard. Shards cover every row
    exactly once, in file order.
    """
    if rows_per_shard < 1:
        raise ValueError("data.rows_per_shard must be >= 1")
    shards: list[Shard] = []
    offset = 0
    for uri, rows in files:
        n_pieces = -(-rows // rows_per_shard)
        for p in range(n_pieces):
            # Even split keeps shards balanced instead of leaving one small tail.
            start, stop = rows * p // n_pieces, rows * (p + 1) // n_pieces
            shards.append(Shard(len(shards), uri, start, stop, offset))
        offset += rows
    return shards
