"""Training state as data: arrays in an .npz, the structure around them as JSON.

A checkpoint lives in the output prefix, which other people and jobs can write to, so reading
one must never run code: no pickle (`np.load(allow_pickle=False)`, `json.loads`). The state is
a tree of dicts, lists and tuples over numbers, strings, None, torch tensors, numpy arrays and
`Params`; each array is stored under its own name, and the JSON tree refers to it.
"""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import torch

from pipeline.errors import InputError
from pipeline.index.params import Params

TREE = "__tree__"  # the JSON structure, stored as a uint8 array beside the others


def dumps(state) -> bytes:
    arrays: dict[str, np.ndarray] = {}

    def put(x) -> str:
        name = f"a{len(arrays)}"
        arrays[name] = x
        return name

    def enc(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu()
            return {"tensor": [put(t.float().numpy() if t.dtype == torch.bfloat16
                                   else t.numpy()), str(t.dtype)]}
        if isinstance(x, np.ndarray):
            if x.dtype == object:
                raise TypeError("object arrays are not stored: they would need pickle")
            return {"array": put(x)}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, Params):
            return {"params": {k: put(v) for k, v in x.arrays().items()}}
        if isinstance(x, dict):
            return {"dict": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"tuple": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, str):
            return str(x)  # a str-valued enum is stored as its value
        if x is None or isinstance(x, (bool, int, float)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} in a checkpoint")

    tree = json.dumps(enc(state)).encode()
    buf = io.BytesIO()
    np.savez(buf, **arrays, **{TREE: np.frombuffer(tree, np.uint8)})
    return buf.getvalue()


def loads(data: bytes):
    """The state dumps() stored. Raises ValueError for anything else, pickles included."""
    return _load(io.BytesIO(data), arrays=True)


def load_meta(f):
    """The state stored in the seekable binary file `f`, without its arrays (each is None):
    only the structure is read (the .npz is a zip, whose members read on their own), so the
    cost does not grow with the model. Raises ValueError as loads() does."""
    return _load(f, arrays=False)


def _load(f, arrays: bool):
    try:
        with np.load(f, allow_pickle=False) as z:
            tree = json.loads(z[TREE].tobytes()) if TREE in z.files else None
            arrays = {k: z[k] for k in z.files} if arrays else None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:  # pickles: ValueError
        raise InputError(f"not a checkpoint of arrays and JSON ({e})") from None
    if tree is None:
        raise InputError("not a checkpoint of arrays and JSON (no structure)")

    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if len(x) != 1:
            raise InputError("not a checkpoint: an entry of several kinds")
        (kind, v), = x.items()
        if arrays is None and kind in ("tensor", "array", "params"):
            return None
        if kind == "tensor":
            name, dtype = v
            return torch.from_numpy(np.array(arrays[name])).to(
                getattr(torch, dtype.removeprefix("torch.")))
        if kind == "array":
            return arrays[v]
        if kind == "params":
            return Params.from_arrays({k: arrays[name] for k, name in v.items()})
        if kind == "dict":
            return {_key(dec(k)): dec(val) for k, val in v}
        if kind == "tuple":
            return tuple(dec(e) for e in v)
        raise InputError(f"not a checkpoint: unknown entry {kind!r}")

    return dec(tree)


def _key(k):
    return tuple(k) if isinstance(k, list) else k
