"""What each stage hands the stages below it: one frozen dataclass per stage, written into the
stage's record and read back by one serializer (`dump` / `load`), so that a field a stage
stops writing fails where it is read back, naming the stage, instead of as a KeyError deep in
another stage."""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass

from pipeline.errors import InputError


@dataclass(frozen=True)
class Plan:
    """The corpus from file metadata alone (ingest.preflight): before Ray starts."""
    n: int  # corpus vectors
    d: int  # their dimension
    shards: list  # Shard dicts (pipeline.data.plan.Shard.to_dict), in corpus order
    train_query_files: list  # [file, rows, fingerprint] of the training queries
    inputs: dict  # {"section.field": digest of that input's files' identities}
    string_ids: bool = False  # the corpus's ids are strings: the index holds row numbers
    resolved: dict = dataclasses.field(default_factory=dict)  # {"index.nlist": n} for autos


@dataclass(frozen=True)
class Ingested(Plan):
    sample: int = 0  # training sample rows (ingest/sample.npz)
    train_queries: int = 0  # training queries (or pseudo-queries) the teacher reads
    spans: dict = dataclasses.field(default_factory=dict)  # {shard key: [id_min, id_max]}
    max_abs: float = 0.0  # the corpus's largest coordinate
    changed_shards: int = 0  # incremental rebuilds: shards new or changed since the last run


@dataclass(frozen=True)
class Initialized:
    train_seconds: float  # k-means and PQ / OPQ / RQ training
    n_train: int  # vectors it trained on
    device: str = ""  # where k-means ran, and the faiss that ran it


@dataclass(frozen=True)
class Taught:
    train: list  # teacher parts (Parquet) of the training queries
    val: list  # teacher parts of the held-out queries
    rows: dict  # {"train": rows, "val": rows}
    queries: int  # training queries taught
    workers: int = 0  # search workers
    object_store_bytes: int = 0  # search results, merges and vectors that moved through it
    device: str = ""  # where the search workers searched, and with what


@dataclass(frozen=True)
class Trained:
    history: list  # per validation: step, loss parts, validation recall
    warm_val: float  # validation recall of the warm start
    best_val: float  # of the exported student
    seconds: float
    worker_read_shares: list  # each worker's share of the rows, per epoch
    worker_read_bytes: list
    device: str = ""  # where the workers trained, and the torch that did it


@dataclass(frozen=True)
class Exported:
    d: int
    bytes_per_vector: int


@dataclass(frozen=True)
class Encoded:
    counts: dict  # {method: vectors encoded}
    shards: int
    layouts: dict  # {method: folder of its encoded shards}
    device: str = ""  # where the shards were encoded, and the faiss that did it


@dataclass(frozen=True)
class MergedIndex:
    folder: str  # its folder in a published version
    uri: str  # the merged parts in the run folder
    ntotal: int
    files: dict  # {name: {"sha256", "bytes"}}, taken where each file was written
    parts: list[str]  # each part's header (pipeline.index.ondisk.part_files), in list order
    fastscan: list[str]  # each part's fast-scan export (build.fastscan), else empty


@dataclass(frozen=True)
class Merged:
    indexes: dict[str, MergedIndex]  # by method (pipeline.workflow.stage.METHODS)
    parts: int  # parts per index (build.output_parts)
    requests: int  # ranged reads of encoded shards: 2 per part and shard
    bytes_read: int  # what they read


@dataclass(frozen=True)
class Evaluated:
    rows: list  # report rows (pipeline.index.metrics.rows_from_sums)
    queries: int
    exact_blocks: int = 0  # query blocks whose exact top-k this run searched (0: all kept)


def dump(result) -> dict:
    """A result as the JSON a stage record holds."""
    return json.loads(json.dumps(dataclasses.asdict(result)))


def load(cls, info: dict, stage: str):
    """The `cls` result that `dump` wrote, from stage `stage`'s record."""
    if not isinstance(info, dict):
        raise InputError(f"stage {stage}: its record holds no result; rerun it")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)
             if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in names if n not in info]
    if missing:
        raise InputError(f"stage {stage}: its record lacks {', '.join(missing)} (written by "
                         "an older version?); rerun it with --from-stage " + stage)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in info:
            continue
        value, typ = info[f.name], hints[f.name]
        args = typing.get_args(typ)
        if typing.get_origin(typ) is dict and args and dataclasses.is_dataclass(args[1]):
            value = {k: load(args[1], v, stage) for k, v in value.items()}
        kwargs[f.name] = value
    return cls(**kwargs)
