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
    train_queries: str = ""  # unlabeled training queries; empty: corpus samples as pseudo-queries
    eval_queries: str = ""  # held-out queries for evaluation; empty: skip evaluation
    labels: str = ""  # optional Parquet (query_id, doc_id) for label MRR/recall
    rows_per_shard: int = 250_000  # corpus rows per shard task (files are split, never merged)
    max_train_queries: int = 0  # 0: all
    max_eval_queries: int = 0  # 0: all
    pseudo_queries: int = 20_000  # corpus samples used as queries when train_queries is empty
    verify: Verify = Verify.METADATA

    def __post_init__(self):
        _typed_modes(self)


@dataclass(frozen=True)
class IndexConfig:
    nlist: int = 256
    M: int = 8  # sub-quantizers; bytes per vector = M * nbits / 8
    nbits: int = 8
    opq: bool = True  # learn (and distil) an OPQ rotation in front of the PQ
    metric: Metric = Metric.IP
    quantizer: Quantizer = Quantizer.PQ  # rq is KDindex's AQ student; it takes no OPQ
    rq_beam: int = 1  # RQ only: encoding beam width (1: greedy, as the student trains)

    def __post_init__(self):
        _typed_modes(self)


@dataclass(frozen=True)
class InitConfig:
    train_sample: int = 100_000  # corpus vectors sampled for k-means/PQ and negatives
    niter: int = 20
    seed: int = 0


@dataclass(frozen=True)
class TeacherConfig:
    k: int = 10  # exact neighbours per training query
    query_block: int = 4096
    # A sample of deeper neighbours beside the top k: about band_size per query, drawn
    # uniformly from ranks k+1..band_depth (pipeline.index.knn.Band); 0: none. The ranking
    # loss keeps ordering the top k (train.rank_top); the band gives the KL the documents
    # around rank 100 to order, which recall@100 needs, for about band_size more neighbour
    # vectors per query instead of band_depth (README: recall@100). Training's cost grows
    # with k + band_size: each drawn neighbour is rotated, quantized and scored.
    band_depth: int = 300
    band_size: int = 20


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 256  # global batch (queries), split across workers
    # Codebook and centroid learning rate, in units of the warm start's RMS coordinate times
    # its relative reconstruction error (pipeline.quant.train.calibrate), so that it means
    # the same on any data scale and steps shrink as codes get finer. On the shared data
    # (unit-norm 384-d) 0.05 is an Adam step of 9.7e-4 at 8 B and 4.5e-4 at 32 B.
    lr: float = 0.05
    # The same for an RQ student. Its stages are coupled (each quantizes what the earlier ones
    # left), so a step that suits PQ moves every later stage's input: it takes smaller steps.
    rq_lr: float = 0.0065
    rotation_lr: float = 1e-4  # radians (the rotation is scale-free)
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    # "ranking": KDindex's ranking loss (the student keeps the teacher's order of the top-k,
    # each above all ranked below it); "kl": Distill-VQ's listwise KL over the candidates;
    # "ranking+kl": both. The ranking loss aims at the top k only; the KL's softer targets
    # carry the order of the rest of the list, which recall@100 needs (README: ablations).
    loss: Loss = Loss.RANKING_KL
    # The ranking loss orders the teacher's best `rank_top` neighbours, each above every
    # candidate below it; 0: teacher.k. The neighbours past rank_top (a deeper teacher.k, the
    # band) are the hardest negatives of the ranking loss, and the KL's soft targets order
    # them: what recall@100 needs.
    rank_top: int = 0
    # Softmax temperatures, relative to each query's teacher-score spread (scale-free): the
    # ranking loss's (and the contrastive term's), and the KL's.
    temperature: float = 0.5
    # 1.0 with the band: a sharper KL over a deeper list. 2.0 buys recall@10 with recall@100
    # at 16 B, and gave more of both with corpus samples as the queries (README).
    kl_temperature: float = 1.0
    kl_weight: float = 100.0  # weight of the KL term in "ranking+kl" (the scales differ)
    # With a band (teacher.band_*), each drawn neighbour counts in the losses for the ranks it
    # was drawn from (1 / draw rate of them, about 14 with the defaults), so that a list of
    # k + band_size neighbours weighs the deeper ranks as the whole top band_depth would.
    # Unweighted, the ranks 11-100 (90 of a query's top 100) weigh about as much as its top 10.
    # Off by default: at 16 B it raised recall@100 at 4-32 lists probed but lowered it at 1
    # (README: recall@100).
    band_weighting: bool = False
    negatives: int = 256  # corpus negatives shared by a batch (from the sample pool)
    # Per query, this many pool vectors drawn from its own list (the one it probes first
    # under the current student): the documents that compete with its neighbours when one
    # list is probed. The teacher list reaches rank band_depth and the other candidates lie
    # mostly in other lists, so without them nothing orders a list's deeper documents below
    # the query's top 100 (README: list negatives). Each is quantized and scored like a band
    # neighbour, and is an in-batch candidate of the other queries: kept to its own query,
    # 16 lowered recall@100. 32, not 16: at 16 B on symmetric data, 16 left recall@100 with
    # one list probed a hair below faiss's (README: 32 list negatives); a step cost 1.4x that
    # with 16 before each document was quantized once (README: a cheaper step).
    list_negatives: int = 32
    negative_sampler: NegativeSampler = NegativeSampler.RANDOM
    ivf_negative_nprobe: int = 8  # lists per query that "ivf" negatives come from
    in_batch: bool = True  # also score the other queries' neighbours
    # Weight of the Distill-VQ coarse (IVF) distillation term. 0.3 with the band: at 1.0 the
    # coarse term over the deeper list pulled against the codebooks' (README: recall@100).
    ivf_weight: float = 0.3
    recon_weight: float = 0.0  # KDindex reconstruction term, relative to the warm-start error
    # KDindex balance: cross-entropy of the soft list/codeword assignment of the pool negatives
    # to its Sinkhorn-Knopp balanced plan, so that no list or codeword is left unused.
    balance_weight: float = 0.0
    sinkhorn_iters: int = 3
    # InfoNCE on labeled (query, document) pairs; needs labels for the *training* queries,
    # which only bench/quality.py --train-labels provides: the pipeline refuses it.
    contrastive_weight: float = 0.0
    # The straight-through soft codeword assignment's temperature, relative to each
    # sub-vector's mean squared distance to the codewords. The forward pass is always the
    # hard codeword; this shapes only the gradient. 0.05 against the old 0.1 raised every
    # recall at 8 and 16 B (README: the soft assignment); 0.02 was as good, 0.01 worse.
    soft_temperature: float = 0.05
    learn_ivf: bool = True
    learn_pq: bool = True
    learn_rotation: bool = True
    val_fraction: float = 0.05  # queries held out (by id) for validation; kept in memory
    # Validations per epoch (the last at its end). One that falls below the best so far
    # restores the best student and multiplies every learning rate by lr_backoff (1: never),
    # so steps still too large for the data shrink by themselves instead of undoing training.
    val_checks: int = 4
    lr_backoff: float = 0.5
    # A fall counts only when it exceeds backoff_z standard errors of the per-query recall
    # difference (paired, on the same held-out queries), so that noise in the validation
    # recall never shrinks the steps. With 0, any fall counts.
    backoff_z: float = 2.0
    max_val_queries: int = 5000  # cap on the held-out queries each worker keeps in memory
    shuffle_buffer: int = 16384  # rows shuffled together, over all streams (0: file order)
    # The training rows are cut into this many contiguous streams; worker r of W reads the
    # streams s with s % W == r, and each global batch takes batch_size / streams rows from
    # every stream (pipeline.data.teacher_stream). A multiple of num_workers that divides
    # batch_size; results do not depend on num_workers.
    streams: int = 8
    num_workers: int = 1
    # Ray Train restarts the workers this many times after one (or its node) is lost; they
    # resume from the last epoch's checkpoint.
    max_failures: int = 3
    use_gpu: bool = False
    seed: int = 0

    def __post_init__(self):
        _typed_modes(self)


@dataclass(frozen=True)
class BuildConfig:
    # Inverted-list ranges merged in parallel (faiss's hslice pattern); 0: one per GiB of codes
    # and ids, at least one per cluster CPU. The index is byte-identical whatever the value.
    list_ranges: int = 0
    # Also publish each index as faiss IndexIVFPQFastScan (fastscan.index beside the on-disk
    # pair): 4-bit codes packed for SIMD search with quantized look-up tables, 2.3-2.5x the
    # queries/s of 8-bit PQ at the same nprobe (README). faiss keeps fast-scan lists in
    # memory only (OnDiskInvertedLists holds no packed blocks), so the merge keeps the
    # on-disk 4-bit IVF-PQ and one task converts it: that task holds the whole index (codes
    # and ids) in memory. Needs index.nbits=4 and index.quantizer=pq.
    fastscan: bool = False


@dataclass(frozen=True)
class EvalConfig:
    nprobe: tuple[int, ...] = (1, 4, 16, 32)
    k: int = 100


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # empty: attach to RAY_ADDRESS or start a local cluster
    num_cpus: int = 0  # local cluster only; 0: max(4, cores) so Train's controller gets a slot
    # GPUs per teacher/encode task; > 0 runs them on the GPU, and init's k-means on one GPU.
    gpus_per_task: float = 0.0
    # Custom resources that tell the node groups of infra/cluster-aws.yaml apart: teacher and
    # training run only on nodes offering gpu_group, ingest, init, encode, merge and evaluate
    # only on nodes offering cpu_group. Empty: any node. Not in any stage key (placement
    # changes no result).
    gpu_group: str = ""
    cpu_group: str = ""


@dataclass(frozen=True)
class PublishConfig:
    # Versions kept: the ones current most recently (at least 2: the current one and the one
    # it replaced always stay), and any that stopped being current less than grace_seconds
    # ago, since a reader that resolved the pointer just before may still be reading it.
    keep_versions: int = 3
    grace_seconds: float = 600.0
    # A job renews its lease on the output every lease_seconds / 8 and stops writing once no
    # renewal succeeded for 3/4 of it; a lease left unchanged for lease_seconds is dead, and
    # another job may take it over (docs/operations.md).
    lease_seconds: float = 120.0
    # Refuse an S3 store that ignores If-None-Match / If-Match (checked on a scratch key at
    # start): without them neither the lease nor the pointer swap is safe. false: warn only.
    require_conditional_writes: bool = True


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
    if pub.keep_versions < 2 or pub.lease_seconds <= 0 or pub.grace_seconds < 0:
        raise ValueError(
            "publish.keep_versions must be >= 2 (the current version and the one it replaced "
            "always stay, since readers may hold either), publish.lease_seconds > 0 and "
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
