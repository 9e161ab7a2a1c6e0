"""Pipeline configuration: one frozen dataclass per stage, composed into `PipelineConfig`.

Loaded from YAML and overridden with `section.key=value` strings. Unknown keys and wrong
types raise `ValueError` naming the key and what is accepted, before any work starts.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import typing
from dataclasses import dataclass, field

import yaml

# Modes are types. Each is a str subclass, so that it reads from YAML, compares with its
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
    LSQ = "lsq"  # faiss's LocalSearchQuantizer: a benchmark baseline only, never distilled


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


class LRSchedule(_Mode):
    """How the learning rates move over the whole training (on top of the backoff)."""
    CONSTANT = "constant"
    COSINE = "cosine"  # half a cosine from the full rate down to zero at the last step


def _typed_modes(obj) -> None:
    """Turns mode fields given as plain strings (Python callers, dataclasses.replace) into
    their enum, so that code downstream can rely on the type."""
    for name, typ in typing.get_type_hints(type(obj)).items():
        if isinstance(typ, type) and issubclass(typ, enum.Enum):
            value = getattr(obj, name)
            if not isinstance(value, typ):
                object.__setattr__(obj, name, _coerce(value, typ, f"{type(obj).__name__}.{name}"))


@dataclass(frozen=True)
class DataConfig:
    corpus: str = ""  # local path or s3:// prefix: Parquet (id, embedding), .npy, .fvecs, .bvecs
    train_queries: str = ""  # unlabeled training queries; empty: corpus samples stand in
    eval_queries: str = ""  # held-out queries for evaluation; empty: the index is not evaluated
    labels: str = ""  # optional Parquet (query_id, doc_id) for label MRR@10 and recall@10
    rows_per_shard: int = 250_000  # corpus rows per shard task (files are split, never merged)
    max_train_queries: int = 0  # use at most this many training queries; 0: all
    max_eval_queries: int = 0  # evaluate at most this many queries; 0: all
    pseudo_queries: int = 20_000  # corpus samples used as queries when train_queries is empty
    verify: Verify = Verify.METADATA  # how a rerun tells that an input file changed

    def __post_init__(self):
        _typed_modes(self)


@dataclass(frozen=True)
class IndexConfig:
    nlist: int = 256  # inverted lists (IVF)
    M: int = 8  # sub-quantizers (PQ) or stages (RQ); bytes per vector = M * nbits / 8
    nbits: int = 8  # bits per code; 4 with M = 2 x bytes for fast-scan
    opq: bool = True  # learn (and distil) an OPQ rotation in front of the PQ
    metric: Metric = Metric.IP  # ip for normalised embeddings (cosine), l2 otherwise
    quantizer: Quantizer = Quantizer.PQ  # pq (IVF-PQ / IVF-OPQ) or rq (KDindex's additive student; no OPQ)
    rq_beam: int = 1  # RQ only: encoding beam width (1: greedy, as the student trains)

    def __post_init__(self):
        _typed_modes(self)


@dataclass(frozen=True)
class InitConfig:
    train_sample: int = 100_000  # corpus vectors sampled for k-means, PQ and the negative pool
    niter: int = 20  # k-means iterations of the coarse quantizer
    opq_niter: int = 50  # OPQ rotation iterations (faiss's default); the demo takes fewer
    seed: int = 0  # seed of the sample and of k-means


@dataclass(frozen=True)
class TeacherConfig:
    k: int = 10  # exact neighbours per training query (the ranking loss orders them)
    query_block: int = 4096  # training queries per teacher task
    # The band: about band_size neighbours per query drawn from ranks k+1..band_depth, which
    # the KL term orders and recall@100 needs (docs/method.md). Training's cost grows with
    # k + band_size. Both 0: no band.
    band_depth: int = 300  # the band's deepest rank; 0: no band
    band_size: int = 20  # neighbours drawn per query from the band; 0: no band


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3  # passes over the training queries
    batch_size: int = 256  # global batch (queries), split evenly across workers
    # Learning rates are in units of the warm start's RMS coordinate times its relative
    # reconstruction error (pipeline.quant.loop.calibrate), so that one value serves any data
    # scale and finer codes take smaller steps.
    lr: float = 0.05  # codebook and centroid learning rate (Adam), in warm-start units
    rq_lr: float = 0.0065  # the same for an RQ student, whose coupled stages need smaller steps
    rotation_lr: float = 1e-4  # rotation learning rate, in radians
    lr_schedule: LRSchedule = LRSchedule.CONSTANT  # constant, or cosine to zero at the last step
    loss: Loss = Loss.RANKING_KL  # ranking (KDindex), kl (Distill-VQ) or both (docs/method.md)
    rank_top: int = 0  # the ranking loss orders the teacher's best rank_top; 0: teacher.k
    temperature: float = 0.5  # ranking (and contrastive) softmax temperature, per query's teacher-score spread
    kl_temperature: float = 1.0  # the KL's temperature, in the same units
    kl_weight: float = 100.0  # weight of the KL term in ranking+kl (the two scales differ)
    band_weighting: bool = False  # weigh each band neighbour by the ranks it stands for (1 / draw rate)
    negatives: int = 256  # corpus negatives shared by a batch, drawn from the sample pool
    # List negatives: the documents that compete with a query's neighbours when one list is
    # probed, which nothing else shows the student (docs/method.md: list negatives).
    list_negatives: int = 32  # per query, pool vectors drawn from the list it probes first; 0: none
    negative_sampler: NegativeSampler = NegativeSampler.RANDOM  # random pool vectors, or ivf: from the lists the batch probes
    ivf_negative_nprobe: int = 8  # lists per query that ivf negatives come from
    in_batch: bool = True  # also score the other queries' neighbours
    ivf_weight: float = 0.3  # weight of the coarse (IVF) distillation term
    recon_weight: float = 0.0  # KDindex reconstruction term, relative to the warm-start error
    balance_weight: float = 0.0  # KDindex balance term: pulls list and codeword use to a Sinkhorn-Knopp plan
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations of the balance term
    # InfoNCE on labeled (query, document) pairs needs labels for the training queries, which
    # only bench/quality.py --train-labels provides: the pipeline refuses it.
    contrastive_weight: float = 0.0  # InfoNCE weight (benchmark only)
    soft_temperature: float = 0.05  # straight-through soft assignment's temperature, per mean codeword distance (gradient only)
    learn_ivf: bool = True  # learn the IVF centroids
    learn_pq: bool = True  # learn the PQ / RQ codebooks
    learn_rotation: bool = True  # learn the OPQ rotation
    val_fraction: float = 0.05  # training queries held out (by id) to pick the student; in (0, 1)
    # A validation below the best so far by more than backoff_z standard errors of the paired
    # per-query difference restores the best student and multiplies every learning rate by
    # lr_backoff, so that steps too large for the data shrink instead of undoing training.
    val_checks: int = 4  # validations per epoch (the last at its end)
    lr_backoff: float = 0.5  # learning-rate factor after a significant fall (1: never)
    backoff_z: float = 2.0  # standard errors a fall must exceed to count (0: any fall)
    max_val_queries: int = 5000  # held-out queries each worker keeps in memory
    shuffle_buffer: int = 16384  # rows shuffled together, over all streams (0: file order)
    # Worker r of W reads the streams s with s % W == r, and each global batch takes
    # batch_size / streams rows from every stream (pipeline.data.teacher_stream), so results
    # do not depend on num_workers.
    streams: int = 8  # contiguous streams of the training rows; a multiple of num_workers dividing batch_size
    num_workers: int = 1  # Ray Train workers (data parallel)
    max_failures: int = 3  # worker restarts after a lost worker or node; they resume from the last checkpoint
    use_gpu: bool = False  # one GPU per training worker (needs a CUDA build of torch)
    seed: int = 0  # seed of batches, draws and the held-out split

    def __post_init__(self):
        _typed_modes(self)


@dataclass(frozen=True)
class BuildConfig:
    # The index is byte-identical whatever the value.
    list_ranges: int = 0  # inverted-list ranges merged in parallel; 0: one per GiB of codes, at least one per cluster CPU
    # faiss keeps fast-scan lists in memory only, so the merge keeps the on-disk 4-bit IVF-PQ
    # and one task converts it, holding the whole index (docs/outputs.md: fast-scan).
    fastscan: bool = False  # also publish each index as IndexIVFPQFastScan (needs index.nbits=4, quantizer pq)


@dataclass(frozen=True)
class EvalConfig:
    nprobe: tuple[int, ...] = (1, 4, 16, 32)  # lists probed in the evaluation sweep
    k: int = 100  # results per query (recall@10 and recall@100 read them)


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # Ray cluster to attach to; empty: RAY_ADDRESS, or a local cluster
    num_cpus: int = 0  # local cluster only; 0: max(4, cores), so Train's controller gets a slot
    gpus_per_task: float = 0.0  # GPUs per teacher and encode task (and one for init's k-means); 0: CPUs
    # Custom resources that tell the node groups of infra/cluster-aws.yaml apart. In no stage
    # key: placement changes no result.
    gpu_group: str = ""  # teacher and training run only on nodes offering it; empty: any node
    cpu_group: str = ""  # ingest, init, encode, merge, evaluate run only on nodes offering it


@dataclass(frozen=True)
class PublishConfig:
    # The current version and the one it replaced always stay (docs/operations.md: pruning).
    keep_versions: int = 3  # versions kept, the most recently current first; at least 2
    grace_seconds: float = 600.0  # a version that stopped being current less than this ago stays
    lease_seconds: float = 120.0  # the lease's time to live; renewed every eighth of it
    # Without If-None-Match / If-Match neither the lease nor the pointer swap is safe.
    require_conditional_writes: bool = True  # refuse an S3 store that ignores conditional writes; false: warn


@dataclass(frozen=True)
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    init: InitConfig = field(default_factory=InitConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self, *sections: str) -> str:
        """Stable hash of the whole config, or of the named sections only."""
        d = self.to_dict()
        if sections:
            d = {s: d[s] for s in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _coerce(value, typ, where: str):
    origin = typing.get_origin(typ)
    if origin is tuple:
        (inner, _ellipsis) = typing.get_args(typ)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list of {inner.__name__}, got {value!r}")
        return tuple(_coerce(v, inner, where) for v in value)
    if typ is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        choices = [m.value for m in typ]
        if value not in choices:
            raise ValueError(f"{where} must be one of {', '.join(map(repr, choices))}, "
                             f"got {value!r}")
        return typ(value)
    if typ is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {typ} at {where}")


def _build(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in raw.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, typ, f"{where}{name}")
    return cls(**kwargs)


def _apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise ValueError(f"override {override!r} must look like section.key=value")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {p} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {override!r}: the value is not valid YAML: {e}") from None


def load_config(path: str | None = None, overrides: list[str] = ()) -> PipelineConfig:
    raw: dict = {}
    if path:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ValueError(f"--config: {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ValueError(f"--config: {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"--config: {path} must be a mapping of sections (data:, index:, "
                             f"...), not a {type(raw).__name__}")
    for o in overrides:
        _apply_override(raw, o)
    cfg = _build(PipelineConfig, raw, "")
    validate(cfg)
    return cfg


def validate_for_pipeline(cfg: PipelineConfig) -> None:
    """Settings that the benchmark accepts but the pipeline cannot honour."""
    if cfg.train.use_gpu:
        import torch

        if torch.version.cuda is None:
            raise ValueError(
                f"train.use_gpu=true needs a CUDA build of torch, and this one "
                f"({torch.__version__}) is CPU-only: Ray Train would fail joining the workers "
                "(no NCCL). Install the CUDA build (README: Install; the cluster image has it) "
                "or set train.use_gpu=false")
    if cfg.train.contrastive_weight > 0:
        raise ValueError(
            "train.contrastive_weight > 0 needs labels for the training queries, which the "
            "pipeline's teacher stream does not carry (and the shared data's rules forbid); "
            "compare it with bench/quality.py --train-labels PATH instead")
    tr = cfg.train
    # The pipeline's training streams (pipeline.data.teacher_stream); the benchmark trains
    # in memory and has none.
    if tr.streams < 1 or tr.streams % tr.num_workers or tr.batch_size % tr.streams:
        raise ValueError(
            f"train.streams ({tr.streams}) must be a multiple of train.num_workers "
            f"({tr.num_workers}) and divide train.batch_size ({tr.batch_size}): every worker "
            "reads whole streams, and every stream gives each batch the same number of rows")


def validate(cfg: PipelineConfig) -> None:
    """Checks that need no data. Checks against the data's dimension live in ingest."""
    ix, tr = cfg.index, cfg.train
    if ix.nbits not in range(1, 17) or ix.M < 1 or ix.nlist < 1:
        raise ValueError("index.M and index.nlist must be >= 1 and index.nbits in 1..16")
    if cfg.teacher.k < 1 or cfg.eval.k < 1:
        raise ValueError("teacher.k and eval.k must be >= 1")
    te = cfg.teacher
    if (te.band_depth or te.band_size) and not 0 < te.band_size < te.band_depth - te.k:
        raise ValueError(
            f"teacher.band_size={te.band_size} drawn from ranks {te.k + 1}..{te.band_depth} "
            "(teacher.band_depth): needs 0 < band_size < band_depth - teacher.k; set both to 0 "
            "for no band")
    if tr.epochs < 1:
        raise ValueError(f"train.epochs must be >= 1, got {tr.epochs}")
    pub = cfg.publish
    if pub.keep_versions < 2 or pub.lease_seconds < 8 or pub.grace_seconds < 0:
        raise ValueError(
            "publish.keep_versions must be >= 2 (the current version and the one it replaced "
            "always stay, since readers may hold either), publish.lease_seconds >= 8 (a "
            "shorter lease cannot fit a storage call inside its margin) and "
            "publish.grace_seconds >= 0")
    if tr.num_workers < 1 or tr.batch_size < tr.num_workers:
        raise ValueError("train.num_workers must be >= 1 and train.batch_size >= num_workers")
    if tr.batch_size % tr.num_workers:
        raise ValueError(
            f"train.batch_size ({tr.batch_size}) must be divisible by train.num_workers "
            f"({tr.num_workers}) so that every worker gets an equal slice of the global batch")
    if tr.max_failures < 0:
        raise ValueError("train.max_failures must be >= 0 (0: a lost worker fails the job)")
    if ix.quantizer == Quantizer.LSQ:
        raise ValueError("index.quantizer=lsq is a faiss baseline of the quality benchmark "
                         "only (bench/quality.py --baselines lsq); distil pq or rq")
    if ix.quantizer == "rq" and ix.opq:
        raise ValueError("index.quantizer=rq takes no OPQ rotation: set index.opq=false")
    if cfg.build.fastscan and (ix.nbits != 4 or ix.quantizer != Quantizer.PQ):
        raise ValueError(
            f"build.fastscan packs 4-bit PQ codes; this index has index.quantizer="
            f"{ix.quantizer.value} and index.nbits={ix.nbits}: set index.quantizer=pq and "
            f"index.nbits=4 (and index.M to twice the bytes per vector)")
    if ix.rq_beam < 1:
        raise ValueError("index.rq_beam must be >= 1 (1 encodes greedily)")
    if tr.rank_top < 0:
        raise ValueError(f"train.rank_top must be >= 0 (0: all teacher.k), got {tr.rank_top}")
    if tr.list_negatives < 0:
        raise ValueError(f"train.list_negatives must be >= 0 (0: none), got {tr.list_negatives}")
    if tr.ivf_negative_nprobe < 1 or tr.sinkhorn_iters < 1:
        raise ValueError("train.ivf_negative_nprobe and train.sinkhorn_iters must be >= 1")
    if min(tr.balance_weight, tr.contrastive_weight, tr.recon_weight, tr.ivf_weight) < 0:
        raise ValueError("train.*_weight values must be >= 0")
    if tr.val_checks < 1 or not 0 < tr.lr_backoff <= 1:
        raise ValueError("train.val_checks must be >= 1 and train.lr_backoff in (0, 1] "
                         "(1 keeps the learning rates)")
    if min(tr.lr, tr.rq_lr, tr.rotation_lr) <= 0:
        raise ValueError("train.lr, train.rq_lr and train.rotation_lr must be > 0 (freeze a "
                         "part with train.learn_ivf / learn_pq / learn_rotation instead)")
    if tr.backoff_z < 0:
        raise ValueError(
            f"train.backoff_z must be >= 0 (0: any fall backs off), got {tr.backoff_z}")
    if not 0 < tr.val_fraction < 1:
        raise ValueError(
            f"train.val_fraction must be in (0, 1), got {tr.val_fraction}: the held-out "
            "queries pick the student to export, and with none every student scores alike "
            "and the warm start would ship as the distilled index")
    if any(p < 1 for p in cfg.eval.nprobe):
        raise ValueError("eval.nprobe values must be >= 1")
    if cfg.build.list_ranges < 0:
        raise ValueError("build.list_ranges must be >= 0 (0 picks them by size and CPUs)")
    if cfg.ray.gpus_per_task < 0:
        raise ValueError("ray.gpus_per_task must be >= 0 (0 runs teacher and encode on CPUs)")
    if not cfg.data.corpus:
        raise ValueError("data.corpus is empty: set it to a local path or s3:// prefix")


def _field_docs(cls) -> dict[str, str]:
    """{field: its one-line doc}: the comment on the field's line (the comments above a field
    say why, for readers of the code). The comments in this file are the documentation."""
    import inspect
    import re

    docs = {}
    for line in inspect.getsource(cls).splitlines()[1:]:
        m = re.match(r"\s*(\w+): [^=]+=[^#]*(#\s*(.*))?$", line)
        if m:
            docs[m.group(1)] = (m.group(3) or "").strip()
    return docs


def _shown(value) -> str:
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if isinstance(value, tuple):
        return "`[" + ", ".join(map(str, value)) + "]`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return "empty"
    return f"`{value}`"


def markdown() -> str:
    """docs/configuration.md: every key with its default and meaning, from the dataclasses."""
    out = ["# Configuration", "",
           "Every key of the pipeline's config, with its default. A job reads a YAML preset "
           "(`--config`) and `--set section.key=value` overrides; unknown keys and wrong types "
           "are errors. Modes list their choices. Generated from `pipeline/config.py` by "
           "`python -m pipeline.config --markdown > docs/configuration.md`; a test fails when "
           "this page is stale. Which keys make which stages rerun: "
           "[operations.md](operations.md).", ""]
    for section in dataclasses.fields(PipelineConfig):
        cls = typing.get_type_hints(PipelineConfig)[section.name]
        docs, defaults = _field_docs(cls), cls()
        out += [f"## {section.name}", "", "| key | default | meaning |", "|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            doc = docs.get(f.name, "")
            typ = hints[f.name]
            if isinstance(typ, type) and issubclass(typ, enum.Enum):
                doc += " Choices: " + ", ".join(f"`{m.value}`" for m in typ) + "."
            out.append(f"| `{section.name}.{f.name}` | {_shown(getattr(defaults, f.name))} "
                       f"| {doc.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m pipeline.config --markdown")
    print(markdown(), end="")
