"""The teacher's output as Parquet parts: one row per query with its exact top-k scores,
ids and, for training, the neighbours' vectors. Written by the teacher, read back by
training (streamed) and by evaluation and validation (in memory)."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage


def _fsl(x: np.ndarray) -> pa.FixedSizeListArray:
    x = np.ascontiguousarray(x)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), int(np.prod(x.shape[1:])))


def teacher_table(qids, xq, S, I, V=None) -> pa.Table:
    """One row per query: qid, xq (d,), S (k,), I (k,) and, for training, V (k * d) in the
    dtype the teacher chose (float16, or float32 for coordinates beyond float16's range)."""
    cols = {"qid": pa.array(qids, pa.int64()), "xq": _fsl(xq.astype(np.float32)),
            "S": _fsl(S), "I": _fsl(I)}
    if V is not None:
        cols["V"] = _fsl(V)
    return pa.table(cols)


def _column(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name).combine_chunks()
    if isinstance(col.type, pa.ExtensionType):  # Ray's tensor type, if it converted the column
        return np.asarray(col.to_numpy())
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)


def table_arrays(table: pa.Table, names=("qid", "xq", "S", "I", "V")) -> dict:
    """numpy arrays of a teacher table: qids (n,), xq (n, d), S, I (n, k), V (n, k, d)."""
    out = {}
    for name in names:
        if name not in table.column_names:
            continue
        if name == "qid":
            out["qids"] = table.column("qid").to_numpy()
            continue
        out[name] = _column(table, name)
    if "V" in out:
        out["V"] = out["V"].reshape(len(out["V"]), out["S"].shape[1] if "S" in out
                                    else -1, out["xq"].shape[1])
    return out


def val_mask(qids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Deterministic held-out split by query id, the same in every block and every run."""
    with np.errstate(over="ignore"):
        h = (qids.astype(np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
    return (h >> np.uint64(40)) < np.uint64(int(fraction * (1 << 24)))


# Rows per row group: a training worker reads its spans of the parts by row group
# (pipeline.data.teacher_stream), so small groups keep what it reads close to its share.
ROW_GROUP = 256


def write_table(table: pa.Table, uri: str) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP, write_page_checksum=True)
    storage.write_bytes(uri, buf.getvalue())


def load_parts(uris: list[str], limit: int = 0) -> dict:
    """Concatenates teacher parts into numpy arrays (for query sets that fit in memory:
    evaluation ground truth, the validation split); with `limit`, its first rows only, and
    no more parts are read than that takes."""
    tables, rows = [], 0
    for u in uris:
        if limit and rows >= limit:
            break
        tables.append(pq.read_table(io.BytesIO(storage.read_bytes(u))))
        rows += tables[-1].num_rows
    table = pa.concat_tables(tables)
    return table_arrays(table.slice(0, limit) if limit else table)
