"""The config's modes, and the coercion of YAML and Python values into the declared types."""
from __future__ import annotations

import enum
import re
import types
import typing

from pipeline.errors import InputError

# value and hashes into stage keys as plain text.


class _Mode(str, enum.Enum):
    def __str__(self) -> str:  # the YAML spelling, in messages and f-strings alike
        return self.value


class Metric(_Mode):
    IP = "ip"  # inner product
    L2 = "l2"


class Quantizer(_Mode):
    PQ = "pq"  # product quantizer (IndexIVFPQ), behind an OPQ rotation if index.opq
    RQ = "rq"  # residual (additive) quantizer of M full-width codebooks (IndexIVFResidualQuantizer)
    # RQ's codebooks with the M codes picked jointly (IndexIVFLocalSearchQuantizer): better
    # codes, at 10 to 26 times RQ's encode cost (docs/scale.md); index.M >= 4
    LSQ = "lsq"

    @property
    def additive(self) -> bool:
        """M full-width codebooks whose codewords add up (RQ, LSQ), not sub-vector ones."""
        return self in (Quantizer.RQ, Quantizer.LSQ)


class Coarse(_Mode):
    """The coarse quantizer that assigns a vector (or a query) to its lists."""
    FLAT = "flat"  # exact: d x nlist per assignment
    HNSW = "hnsw"  # faiss IndexHNSWFlat over the centroids (IVF..._HNSW32): about log(nlist)


class Kmeans(_Mode):
    """How init clusters the sample into the coarse centroids."""
    FLAT = "flat"  # faiss k-means: sample x nlist distances per iteration
    TWO_LEVEL = "two-level"  # sqrt(nlist) clusters, each split in turn (faiss.contrib.clustering)


class Loss(_Mode):
    """The distillation loss: which of the two listwise terms it uses."""
    RANKING = "ranking"  # KDindex: keep the teacher's order of the top-k, each above the rest
    KL = "kl"  # Distill-VQ: KL between the teacher's and the student's softmax over candidates
    RANKING_KL = "ranking+kl"

    @property
    def ranking(self) -> bool:
        return self in (Loss.RANKING, Loss.RANKING_KL)

    @property
    def kl(self) -> bool:
        return self in (Loss.KL, Loss.RANKING_KL)


class NegativeSampler(_Mode):
    RANDOM = "random"  # uniform over the sample pool
    IVF = "ivf"  # pool vectors in the lists the batch's queries probe (Distill-VQ's hard negatives)


class Verify(_Mode):
    """How a rerun tells that an input file changed (pipeline.data.readers.fingerprint)."""
    METADATA = "metadata"  # size and ETag on S3; size, mtime, inode and ctime locally
    CONTENT = "content"  # locally also the sha256 of the bytes: every file is read once more


class Baseline(_Mode):
    """Which faiss baseline a run builds beside the distilled index, to compare them."""
    FULL = "full"  # encoded and merged over the whole corpus, published as baseline/
    SAMPLE = "sample"  # both indexes over the training sample, with its own exact neighbours
    OFF = "off"  # none: the corpus is encoded and merged once, for the distilled index only


class LRSchedule(_Mode):
    """How the learning rates move over the whole training (on top of the backoff)."""
    CONSTANT = "constant"
    COSINE = "cosine"  # half a cosine from the full rate down to zero at the last step


def typed_modes(obj) -> None:
    """Turns mode fields given as plain strings (Python callers, dataclasses.replace) into
    their enum, so that code downstream can rely on the type."""
    for name, typ in typing.get_type_hints(type(obj)).items():
        if isinstance(typ, type) and issubclass(typ, enum.Enum):
            value = getattr(obj, name)
            if not isinstance(value, typ):
                object.__setattr__(obj, name, coerce(value, typ, f"{type(obj).__name__}.{name}"))


AUTO = "auto"  # a size the job derives from the data (pipeline.index.sizing)
Auto = typing.Literal["auto"]


def coerce(value, typ, where: str):
    origin = typing.get_origin(typ)
    if origin is typing.Literal:
        if value not in typing.get_args(typ):
            raise InputError(f"{where} must be one of {typing.get_args(typ)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(typ):
            try:
                return coerce(value, arm, where)
            except InputError:
                pass
        names = " or ".join(repr(typing.get_args(a)[0]) if typing.get_origin(a) is typing.Literal
                            else {int: "an integer"}.get(a, a.__name__)
                            for a in typing.get_args(typ))
        raise InputError(f"{where}: expected {names}, got {value!r}")
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(typ)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: expected a list of {inner.__name__}, got {value!r}")
        return tuple(coerce(v, inner, where) for v in value)
    if typ is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        choices = [m.value for m in typ]
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted off / on as a boolean
            value = {False: "off", True: "on"}[value]
        if value not in choices:
            raise InputError(f"{where} must be one of {', '.join(map(repr, choices))}, "
                             f"got {value!r}")
        return typ(value)
    if typ is str:
        if not isinstance(value, str):
            raise InputError(f"{where}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {typ} at {where}")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, where: str) -> int:
    """Bytes from "4GB", "512MiB", "2e9" (decimal units: kB, MB, GB, TB; binary: KiB...)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise InputError(f"{where}: {text!r} is not a size; write e.g. 4GB, 512MiB or 2e9")
    try:
        value = float(m.group(1)) * _UNITS[unit]
    except ValueError:
        raise InputError(f"{where}: {text!r} is not a size; write e.g. 4GB, 512MiB or 2e9"
                         ) from None
    if value < 1:
        raise InputError(f"{where}: {text!r} must be a positive size")
    return int(value)
