"""Readers for the input contract: Parquet (id, embedding), .npy, texmex .fvecs / .bvecs.

Every reader returns `(ids, x)`: ids (n,) int64 and x (n, d) float32. Files without an integer
id column (.npy, .fvecs, .bvecs; Parquet without the id column, or with string ids) get ids
`id_offset + row`, with the offset given by the shard plan (files in sorted order, numbered
consecutively). String ids are kept apart (`read_id_strings`): the published id map turns the
index's row numbers back into them.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import events, storage
from pipeline.errors import InputError

SUFFIXES = (".parquet", ".npy", ".fvecs", ".bvecs")


def list_inputs(uri: str, what: str = "data") -> list[str]:
    """Sorted input files under `uri` (a file, a directory or an s3:// prefix)."""
    fs, path = storage.get_fs(uri)
    scheme = "s3://" if storage.is_s3(uri) else ""
    try:
        if fs.isfile(path):
            files = [path]
        elif fs.isdir(path):
            files = sorted(p for p in fs.find(path) if p.endswith(SUFFIXES))
        else:
            raise InputError(
                f"{what}: {uri} does not exist (check the bucket name and path, and for S3 the "
                "AWS_ENDPOINT_URL and credentials in the environment)"
            )
    except FileNotFoundError as e:
        raise InputError(f"{what}: {uri} does not exist: {e}") from None
    files = [f for f in files if not os.path.basename(f).startswith((".", "_"))]
    if not files:
        raise InputError(f"{what}: no {'/'.join(SUFFIXES)} files under {uri}")
    if not files[0].endswith(SUFFIXES):
        raise InputError(f"{what}: {uri} is not one of {', '.join(SUFFIXES)}")
    return [scheme + f for f in files]


def fingerprint(uri: str, content: bool = False) -> str:
    """The file's identity, which changes when its content does. S3: size and ETag (a hash
    of the content, computed by the store). Local: size, mtime in ns, inode and ctime in ns,
    so that a file replaced by one of the same size with its mtime kept (`cp -p`, `rsync -a`,
    `tar`) still counts as changed: the replacement has a new inode or ctime. content=True
    (data.verify: content) adds the sha256 of a local file's bytes, for files whose every
    time stamp was carried over."""
    fs, path = storage.get_fs(uri)
    if storage.is_s3(uri):
        info = fs.info(path)
        return f"{info.get('size')}-{str(info.get('ETag', '')).strip(chr(34))}"
    st = os.stat(path)
    ident = f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}-{st.st_ctime_ns}"
    return f"{ident}-{storage.sha256_file(path)}" if content else ident


def _parquet_file(uri: str) -> pq.ParquetFile:
    fs, path = storage.get_fs(uri)
    try:
        # Verifies the page checksums where the writer stored them (jobs/prepare_data.py does).
        return pq.ParquetFile(fs.open(path, "rb"), page_checksum_verification=True)
    except (OSError, pa.ArrowException) as e:
        raise InputError(_unreadable(uri, e)) from None


def _unreadable(uri: str, e: Exception) -> str:
    return (f"{uri}: unreadable ({type(e).__name__}: {e}); the file is truncated or corrupt: "
            "write or upload it again")


def _npy_header(f):
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) \
        else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return shape, fortran, dtype, f.tell()


def id_kind(uri: str, column: str = "id") -> str:
    """How a file gives its ids: "int" (an integer column), "string" (a string column, mapped
    to row numbers) or "rows" (no such column, or not Parquet: row numbers)."""
    if not uri.endswith(".parquet"):
        return "rows"
    schema = _parquet_file(uri).schema_arrow
    if column not in schema.names:
        return "rows"
    t = schema.field(column).type
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    raise InputError(f"{uri}: column {column!r} is {t}; ids must be integers (int64, from 0 to "
                     "2**63 - 1) or strings (set data.id_column to the id column)")


def probe(uri: str, id_cols=("id", "embedding"), optional_id: bool = False
          ) -> tuple[int, int | None]:
    """(rows, d) from metadata alone; d is None where only the data tells (list<float>).
    optional_id: a vector file whose id column is absent or holds strings is read with row
    numbers as ids (id_kind); label files (optional_id False) need both columns as integers."""
    fs, path = storage.get_fs(uri)
    if uri.endswith(".parquet"):
        pf = _parquet_file(uri)
        names = pf.schema_arrow.names
        missing = [c for c in id_cols if c not in names and not (optional_id and c == id_cols[0])]
        if missing:
            raise InputError(
                f"{uri}: missing column(s) {missing}; found {names}. The input contract is "
                f"Parquet with columns {list(id_cols)}" + (
                    " (name the vectors' column: data.embedding_column, or --embedding-column)"
                    if optional_id else "")
            )
        if optional_id:
            nulls = _null_count(pf, names.index(id_cols[0])) \
                if id_kind(uri, id_cols[0]) == "string" else 0
            if nulls:
                raise InputError(f"{uri}: column {id_cols[0]!r} has {nulls} null ids; every "
                                 "row needs an id")
        else:
            id_type = pf.schema_arrow.field(id_cols[0]).type
            if not pa.types.is_integer(id_type):
                raise InputError(f"{uri}: column {id_cols[0]!r} is {id_type}; ids must be "
                                 "integers (int64, from 0 to 2**63 - 1)")
        t = pf.schema_arrow.field(id_cols[-1]).type
        d = t.list_size if pa.types.is_fixed_size_list(t) else None
        return pf.metadata.num_rows, d
    with fs.open(path, "rb") as f:
        if uri.endswith(".npy"):
            shape, fortran, dtype, _ = _npy_header(f)
            if len(shape) != 2 or fortran:
                raise InputError(f"{uri}: expected a C-order 2-D array, got shape {shape}")
            want = f.tell() + shape[0] * shape[1] * dtype.itemsize
            if fs.size(path) != want:
                raise InputError(f"{uri}: {fs.size(path)} bytes where its header promises "
                                 f"{want}; the file is truncated or corrupt: write it again")
            return shape[0], shape[1]
        (d,) = struct.unpack("<i", f.read(4))
    size = fs.size(path)
    row = 4 + d * (4 if uri.endswith(".fvecs") else 1)
    if d <= 0 or size % row:
        raise InputError(f"{uri}: not a valid {uri[-5:]} file (size {size}, d {d})")
    return size // row, d


def _null_count(pf: pq.ParquetFile, column: int) -> int:
    """Nulls in a column by its row groups' statistics (0 where a writer kept none)."""
    total = 0
    for g in range(pf.num_row_groups):
        stats = pf.metadata.row_group(g).column(column).statistics
        total += stats.null_count if stats is not None and stats.has_null_count else 0
    return total


def _embedding_to_numpy(col: pa.ChunkedArray, uri: str) -> np.ndarray:
    arr = col.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths.min() != lengths.max()):
            raise InputError(
                f"{uri}: embedding lengths disagree ({lengths.min()} to {lengths.max()}); "
                "every row must have the same dimension"
            )
        d = int(lengths[0]) if len(lengths) else 0
    else:
        raise InputError(f"{uri}: embedding column must be a list of floats, got {arr.type}")
    if arr.null_count:
        raise InputError(f"{uri}: embedding column has {arr.null_count} null rows")
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(len(arr), d)


def read_rows(uri: str, start: int, stop: int, id_offset: int = 0,
              columns=("id", "embedding")) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, stop) of one file: (ids (n,) int64, x (n, d) float32)."""
    fs, path = storage.get_fs(uri)
    if uri.endswith(".parquet"):
        pf = _parquet_file(uri)
        groups, first, pos = [], None, 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if pos + n > start and pos < stop:
                groups.append(g)
                first = pos if first is None else first
            pos += n
        int_ids = id_kind(uri, columns[0]) == "int"
        wanted = list(columns) if int_ids else [columns[1]]
        try:
            table = pf.read_row_groups(groups, columns=wanted)
        except (OSError, pa.ArrowException) as e:
            raise InputError(_unreadable(f"{uri} rows {start}-{stop}", e)) from None
        names = pf.schema_arrow.names
        events.emit("read", nbytes=sum(
            pf.metadata.row_group(g).column(names.index(c)).total_compressed_size
            for g in groups for c in wanted))
        table = table.slice(start - first, stop - start)
        ids = checked_ids(table.column(columns[0]), uri, columns[0]) if int_ids else \
            np.arange(id_offset + start, id_offset + stop, dtype=np.int64)
        return ids, _embedding_to_numpy(table.column(columns[1]), uri)
    ids = np.arange(id_offset + start, id_offset + stop, dtype=np.int64)
    with fs.open(path, "rb") as f:
        if uri.endswith(".npy"):
            shape, _, dtype, offset = _npy_header(f)
            rowbytes = shape[1] * dtype.itemsize
            f.seek(offset + start * rowbytes)
            raw = f.read((stop - start) * rowbytes)
            events.emit("read", nbytes=len(raw))
            return ids, np.frombuffer(raw, dtype=dtype).reshape(-1, shape[1]).astype(np.float32)
        (d,) = struct.unpack("<i", f.read(4))
        itemsize = 4 if uri.endswith(".fvecs") else 1
        row = 4 + d * itemsize
        f.seek(start * row)
        raw = np.frombuffer(f.read((stop - start) * row), dtype=np.uint8).reshape(-1, row)
        events.emit("read", nbytes=raw.nbytes)
    body = raw[:, 4:]
    x = body.copy().view(np.float32) if itemsize == 4 else body.astype(np.float32)
    return ids, x


def read_shard(s) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a shard or query block (pipeline.data.plan.Shard)."""
    return read_rows(s.uri, s.start, s.stop, s.id_offset, s.columns)


def read_id_strings(uri: str, column: str) -> pa.Array:
    """A file's string ids, in row order."""
    return _parquet_file(uri).read(columns=[column]).column(column).combine_chunks()


def checked_ids(col: pa.ChunkedArray, uri: str, name: str) -> np.ndarray:
    """An id column as int64, or a ValueError naming the file, the column and the fix: ids
    are integers in [0, 2**63) (faiss reserves -1 for "no result"), with no nulls."""
    where = f"{uri}: column {name!r}"
    if not pa.types.is_integer(col.type):
        raise InputError(f"{where} is {col.type}; ids must be integers (int64)")
    if col.null_count:
        raise InputError(f"{where} has {col.null_count} null ids; every row needs an id")
    raw = col.to_numpy()
    if raw.dtype == np.uint64 and len(raw) and raw.max() >= 1 << 63:
        raise InputError(f"{where} has ids >= 2**63 (max {raw.max()}); faiss ids are int64")
    ids = raw.astype(np.int64, copy=False)
    if len(ids) and ids.min() < 0:
        raise InputError(f"{where} has negative ids (min {ids.min()}); ids must be >= 0 "
                         "(faiss uses -1 for no result)")
    return ids


def check_block(ids: np.ndarray, x: np.ndarray, where: str, d: int | None = None) -> None:
    """Raises ValueError naming the fix for non-finite values, bad dimension, duplicate ids."""
    if d is not None and x.shape[1] != d:
        raise InputError(f"{where}: dimension {x.shape[1]} disagrees with the corpus's {d}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise InputError(
            f"{where}: {int(bad.sum())} vector(s) contain NaN or inf (first ids "
            f"{ids[rows].tolist()}); clean or drop them before indexing"
        )
    if len(np.unique(ids)) != len(ids):
        u, c = np.unique(ids, return_counts=True)
        raise InputError(f"{where}: duplicate ids {u[c > 1][:5].tolist()}; ids must be unique")


def read_all(uri: str, what: str, limit: int = 0, columns=("id", "embedding")
             ) -> tuple[np.ndarray, np.ndarray]:
    """Every row under `uri`, for query sets (which are assumed to fit in memory)."""
    ids_parts, x_parts, offset, n = [], [], 0, 0
    for f in list_inputs(uri, what):
        rows, _ = probe(f, columns, optional_id=True)
        if not rows:
            continue
        ids, x = read_rows(f, 0, rows, id_offset=offset, columns=columns)
        offset += rows
        ids_parts.append(ids)
        x_parts.append(x)
        n += rows
        if limit and n >= limit:
            break
    if not n:
        raise InputError(f"{what}: {uri} holds no rows; give a non-empty set")
    ids, x = np.concatenate(ids_parts), np.concatenate(x_parts)
    if limit:
        ids, x = ids[:limit], x[:limit]
    check_block(ids, x, what)
    return ids, np.ascontiguousarray(x)


def query_files(what: str, uri: str, d: int, content: bool = False,
                columns=("id", "embedding")) -> list[tuple[str, int, str]]:
    """Metadata checks of a query or label set (`what` names its setting): rows present, the
    corpus's dimension. Returns [(file, rows, fingerprint)] in order (content: see
    fingerprint)."""
    files = list_inputs(uri, what)
    cols = ("query_id", "doc_id") if what == "eval.labels" else columns
    out = []
    for f in files:
        if what == "eval.labels" and not f.endswith(".parquet"):
            raise InputError(f"eval.labels: {f} must be Parquet with columns query_id, doc_id")
        n, qd = probe(f, cols, optional_id=what != "eval.labels")
        if what != "eval.labels" and qd is not None and qd != d:
            raise InputError(f"{what}: dimension {qd} disagrees with the corpus's {d}")
        out.append((f, n, fingerprint(f, content)))
    if not sum(n for _, n, _ in out):
        raise InputError(f"{what}: {uri} holds no rows; give a non-empty set or leave "
                         f"{what} empty")
    return out


def read_labels(uri: str) -> dict[int, set[int]]:
    """query_id -> set of relevant doc ids, from Parquet (query_id, doc_id)."""
    qrels: dict[int, set[int]] = {}
    for f in list_inputs(uri, "eval.labels"):
        if not f.endswith(".parquet"):
            raise InputError(f"eval.labels: {f} must be Parquet with columns query_id, doc_id")
        t = _parquet_file(f).read()
        if not {"query_id", "doc_id"} <= set(t.column_names):
            raise InputError(
                f"eval.labels: {f} needs columns query_id, doc_id; has {t.column_names}")
        for q, dd in zip(checked_ids(t.column("query_id"), f, "query_id"),
                         checked_ids(t.column("doc_id"), f, "doc_id")):
            qrels.setdefault(int(q), set()).add(int(dd))
    if not qrels:
        raise InputError(f"eval.labels: {uri} holds no labels; give some or leave it empty")
    return qrels


def id_map_bytes(shards: list) -> bytes:
    """The id map of a corpus with string ids, as Parquet (index_id int64, id string): the
    index holds each vector under its row number across the files (Shard.id_offset + row),
    and the map gives its string id back. Memory: one file's ids at a time, plus the map's
    Parquet bytes (about the ids' size, compressed)."""
    import io

    files = {}
    for s in shards:  # one entry per file, in corpus order
        files.setdefault(s.uri, s)
    buf = io.BytesIO()
    schema = pa.schema([("index_id", pa.int64()), ("id", pa.large_string())])
    with pq.ParquetWriter(buf, schema) as writer:
        for uri, s in files.items():
            ids = read_id_strings(uri, s.id_column).cast(pa.large_string())
            if ids.null_count:
                raise InputError(f"{uri}: column {s.id_column!r} has {ids.null_count} null ids; "
                                 "every row needs an id")
            index_ids = pa.array(np.arange(s.id_offset, s.id_offset + len(ids)), pa.int64())
            writer.write_table(pa.table([index_ids, ids], schema=schema))
    return buf.getvalue()
