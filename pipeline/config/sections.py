"""The config sections: one frozen dataclass per part of the pipeline, composed into
`PipelineConfig`. Each section checks its own values when it is made (from YAML, from
Python or by dataclasses.replace); rules across sections live in PipelineConfig. A field's
line comment is its documentation (docs/configuration.md is generated from them)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from pipeline.config.modes import (
    AUTO,
    Auto,
    Baseline,
    Coarse,
    Kmeans,
    Loss,
    LRSchedule,
    Metric,
    NegativeSampler,
    Quantizer,
    Verify,
    parse_size,
    typed_modes,
)
from pipeline.errors import InputError


@dataclass(frozen=True)
class DataConfig:
    corpus: str = ""  # local path or s3:// prefix: Parquet (id, embedding), .npy, .fvecs, .bvecs
    train_queries: str = ""  # unlabeled training queries; empty: corpus samples stand in
    rows_per_shard: int = 250_000  # corpus rows per shard task (files are split, never merged)
    max_train_queries: int = 0  # use at most this many training queries; 0: all
    pseudo_queries: int = 20_000  # corpus samples used as queries when train_queries is empty
    train_sample: int = 100_000  # corpus vectors sampled for k-means, PQ and the negative pool
    seed: int = 0  # seed of the training sample and of the pseudo-queries drawn from it
    metric: Metric = Metric.IP  # ip for normalised embeddings (cosine), l2 otherwise
    verify: Verify = Verify.METADATA  # how a rerun tells that an input file changed
    id_column: str = "id"  # Parquet: the ids (int64, or strings: mapped, see docs/outputs.md); absent: row numbers
    embedding_column: str = "embedding"  # Parquet: the vectors (list of float)

    @property
    def columns(self) -> tuple[str, str]:
        return self.id_column, self.embedding_column

    def __post_init__(self):
        typed_modes(self)
        if self.rows_per_shard < 1 or self.train_sample < 1:
            raise InputError("data.rows_per_shard and data.train_sample must be >= 1")
        if not self.id_column or not self.embedding_column \
                or self.id_column == self.embedding_column:
            raise InputError("data.id_column and data.embedding_column must name two different "
                             "columns")


@dataclass(frozen=True)
class IndexConfig:
    nlist: int | Auto = 256  # inverted lists (IVF); auto: about 4 sqrt(corpus), at least 39 sample vectors a list
    M: int | Auto = 8  # sub-quantizers (PQ) or stages (RQ); bytes per vector = M * nbits / 8; auto: the most that memory_budget allows
    memory_budget: str = ""  # the index's size at most this (e.g. 4GB, 512MiB): picks M when it is auto, checks it otherwise
    nbits: int = 8  # bits per code; 4 with M = 2 x bytes for fast-scan
    opq: bool = True  # learn (and distil) an OPQ rotation in front of the PQ
    quantizer: Quantizer = Quantizer.PQ  # pq (IVF-PQ / IVF-OPQ), rq or lsq (KDindex's additive students; no OPQ)
    rq_beam: int = 1  # RQ only: encoding beam width (1: greedy, as the student trains)
    # Encode assigns every corpus vector to a list: d x nlist with a flat quantizer, which at
    # nlist >= 65,536 outweighs the codes' own cost (docs/scale.md).
    coarse: Coarse = Coarse.FLAT  # flat (exact) or hnsw (HNSW32 graph over the centroids, for nlist >= 65,536)

    def __post_init__(self):
        typed_modes(self)
        # nlist 0 is a flat index, which the benchmark compares; the pipeline needs lists.
        if self.memory_budget:
            parse_size(self.memory_budget, "index.memory_budget")
        elif self.M == AUTO:
            raise InputError("index.M=auto needs index.memory_budget (e.g. 4GB): the bytes "
                             "per vector come from it")
        # auto values are resolved against the data in ingest, and checked again then
        M = 8 if self.M == AUTO else self.M
        if self.nbits not in range(1, 17) or M < 1 or (self.nlist != AUTO and self.nlist < 0):
            raise InputError("index.M must be >= 1, index.nlist >= 1 and index.nbits in 1..16")
        if self.quantizer != Quantizer.PQ and self.opq:
            raise InputError(f"index.quantizer={self.quantizer} takes no OPQ rotation: set "
                             "index.opq=false")
        if self.quantizer == Quantizer.LSQ and M < 4:
            raise InputError("index.quantizer=lsq needs index.M >= 4 (faiss's LSQ encoder "
                             "perturbs 4 codes at a time); use rq below 4 bytes")
        if self.rq_beam < 1:
            raise InputError("index.rq_beam must be >= 1 (1 encodes greedily)")


@dataclass(frozen=True)
class InitConfig:
    niter: int = 20  # k-means iterations of the coarse quantizer
    opq_niter: int = 50  # OPQ rotation iterations (faiss's default); the demo takes fewer
    opq_train_points: int = 65536  # sample vectors the OPQ rotation trains on (faiss's default); its cost grows with them
    seed: int = 0  # seed of k-means
    # Flat k-means costs sample x nlist distances per iteration; two-level about
    # sample x 2 sqrt(nlist), which at nlist >= 65,536 on CPUs is the difference between hours
    # and minutes (docs/scale.md). With ray.gpus_per_task, k-means runs flat on the GPUs.
    kmeans: Kmeans = Kmeans.FLAT  # flat, or two-level (sqrt(nlist) clusters, then each split), for large nlist on CPUs


@dataclass(frozen=True)
class TeacherConfig:
    k: int = 10  # exact neighbours per training query (the ranking loss orders them)
    query_block: int = 4096  # training queries per teacher task
    # The band: about band_size neighbours per query drawn from ranks k+1..band_depth, which
    # the KL term orders and recall@100 needs (docs/method.md). Training's cost grows with
    # k + band_size. Both 0: no band.
    band_depth: int = 300  # the band's deepest rank; 0: no band
    band_size: int = 20  # neighbours drawn per query from the band; 0: no band
    val_fraction: float = 0.05  # training queries held out (by id) to pick the student; in (0, 1)
    seed: int = 0  # seed of the band's draws and of the held-out split

    def __post_init__(self):
        if self.k < 1 or self.query_block < 1:
            raise InputError("teacher.k and teacher.query_block must be >= 1")
        if not 0 < self.val_fraction < 1:
            raise InputError(
                f"teacher.val_fraction must be in (0, 1), got {self.val_fraction}: the held-out "
                "queries pick the student to export, and with none every student scores alike "
                "and the warm start would ship as the distilled index")
        if (self.band_depth or self.band_size) and \
                not 0 < self.band_size < self.band_depth - self.k:
            raise InputError(
                f"teacher.band_size={self.band_size} drawn from ranks {self.k + 1}.."
                f"{self.band_depth} (teacher.band_depth): needs 0 < band_size < band_depth - "
                "teacher.k; set both to 0 for no band")


@dataclass(frozen=True)
class LossConfig:
    kind: Loss = Loss.RANKING_KL  # ranking (KDindex), kl (Distill-VQ) or both (docs/method.md)
    rank_top: int = 0  # the ranking loss orders the teacher's best rank_top; 0: teacher.k
    temperature: float = 0.5  # ranking (and contrastive) softmax temperature, per query's teacher-score spread
    kl_temperature: float = 1.0  # the KL's temperature, in the same units
    kl_weight: float = 100.0  # weight of the KL term in ranking+kl (the two scales differ)
    band_weighting: bool = False  # weigh each band neighbour by the ranks it stands for (1 / draw rate)
    ivf_weight: float = 0.3  # weight of the coarse (IVF) distillation term
    recon_weight: float = 0.0  # KDindex reconstruction term, relative to the warm-start error
    balance_weight: float = 0.0  # KDindex balance term: pulls list and codeword use to a Sinkhorn-Knopp plan
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations of the balance term
    # InfoNCE on labeled (query, document) pairs needs labels for the training queries, which
    # only bench/quality.py --train-labels provides: the pipeline refuses it.
    contrastive_weight: float = 0.0  # InfoNCE weight (benchmark only)
    soft_temperature: float = 0.05  # straight-through soft assignment's temperature, per mean codeword distance (gradient only)

    def __post_init__(self):
        typed_modes(self)
        if self.rank_top < 0:
            raise InputError(f"loss.rank_top must be >= 0 (0: all teacher.k), got {self.rank_top}")
        if self.sinkhorn_iters < 1:
            raise InputError("loss.sinkhorn_iters must be >= 1")
        if min(self.balance_weight, self.contrastive_weight, self.recon_weight,
               self.ivf_weight) < 0:
            raise InputError("loss.*_weight values must be >= 0")


@dataclass(frozen=True)
class NegativesConfig:
    corpus: int = 256  # corpus negatives shared by a batch, drawn from the sample pool
    sampler: NegativeSampler = NegativeSampler.RANDOM  # random pool vectors, or ivf: from the lists the batch probes
    ivf_nprobe: int = 8  # lists per query that ivf negatives come from
    # List negatives: the documents that compete with a query's neighbours when one list is
    # probed, which nothing else shows the student (docs/method.md: list negatives).
    per_list: int = 32  # per query, pool vectors drawn from the list it probes first; 0: none
    in_batch: bool = True  # also score the other queries' neighbours

    def __post_init__(self):
        typed_modes(self)
        if self.corpus < 0 or self.per_list < 0:
            raise InputError("negatives.corpus and negatives.per_list must be >= 0 (0: none)")
        if self.ivf_nprobe < 1:
            raise InputError("negatives.ivf_nprobe must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation: steps, rates, what is learned, validation. The loss and the negatives
    have sections of their own, and how many workers run it lives in `ray`."""
    epochs: int = 3  # passes over the training queries
    batch_size: int = 256  # global batch (queries), split evenly across workers
    # Learning rates are in units of the warm start's RMS coordinate times its relative
    # reconstruction error (pipeline.quant.loop.calibrate), so that one value serves any data
    # scale and finer codes take smaller steps.
    lr: float = 0.05  # codebook and centroid learning rate (Adam), in warm-start units
    rq_lr: float = 0.0065  # the same for an RQ student, whose coupled stages need smaller steps
    rotation_lr: float = 1e-4  # rotation learning rate, in radians
    lr_schedule: LRSchedule = LRSchedule.CONSTANT  # constant, or cosine to zero at the last step
    learn_ivf: bool = True  # learn the IVF centroids
    learn_pq: bool = True  # learn the PQ / RQ codebooks
    learn_rotation: bool = True  # learn the OPQ rotation
    # A validation below the best so far by more than backoff_z standard errors of the paired
    # per-query difference restores the best student and multiplies every learning rate by
    # lr_backoff, so that steps too large for the data shrink instead of undoing training.
    val_checks: int = 4  # validations per epoch (the last at its end)
    lr_backoff: float = 0.5  # learning-rate factor after a significant fall (1: never)
    backoff_z: float = 2.0  # standard errors a fall must exceed to count (0: any fall)
    max_val_queries: int = 5000  # held-out queries each worker keeps in memory
    val_pool: int = 100000  # sample vectors each validation encodes and searches (its cost), the first of the sample
    shuffle_buffer: int = 16384  # rows shuffled together, over all streams (0: file order)
    # Worker r of W reads the streams s with s % W == r, and each global batch takes
    # batch_size / streams rows from every stream (pipeline.data.teacher_stream), so results
    # do not depend on ray.train_workers.
    streams: int = 8  # contiguous streams of the training rows; a multiple of ray.train_workers dividing batch_size
    seed: int = 0  # seed of batches and negative draws

    def __post_init__(self):
        typed_modes(self)
        if self.epochs < 1 or self.batch_size < 1:
            raise InputError(f"train.epochs and train.batch_size must be >= 1, got "
                             f"{self.epochs} and {self.batch_size}")
        if self.val_checks < 1 or not 0 < self.lr_backoff <= 1:
            raise InputError("train.val_checks must be >= 1 and train.lr_backoff in (0, 1] "
                             "(1 keeps the learning rates)")
        if min(self.lr, self.rq_lr, self.rotation_lr) <= 0:
            raise InputError("train.lr, train.rq_lr and train.rotation_lr must be > 0 (freeze a "
                             "part with train.learn_ivf / learn_pq / learn_rotation instead)")
        if self.backoff_z < 0:
            raise InputError(
                f"train.backoff_z must be >= 0 (0: any fall backs off), got {self.backoff_z}")
        if self.val_pool < 1000:
            raise InputError(f"train.val_pool must be >= 1000 (a validation index needs "
                             f"vectors to search), got {self.val_pool}")


@dataclass(frozen=True)
class BuildConfig:
    # faiss keeps fast-scan lists in memory only, so the merge keeps the on-disk 4-bit IVF-PQ
    # and one task converts it, holding the whole index (docs/outputs.md: fast-scan).
    fastscan: bool = False  # also publish each index as IndexIVFPQFastScan (needs index.nbits=4, quantizer pq)
    # At scale the baseline doubles the costliest stages (encode, merge) for one report row:
    # `sample` compares the two on the training sample instead (docs/outputs.md: baseline).
    baseline: Baseline = Baseline.FULL  # full, sample or off: the faiss baseline built beside the distilled index
    # Each part is a complete faiss index over one range of inverted lists, written by one
    # task from two ranged reads per encoded shard (docs/outputs.md: parts).
    output_parts: int = 0  # parts of each index; 0: one per GiB of codes and ids (one for small corpora)

    def __post_init__(self):
        typed_modes(self)
        if self.output_parts < 0:
            raise InputError(f"build.output_parts must be >= 0 (0: one part per GiB of the "
                             f"index), got {self.output_parts}")


@dataclass(frozen=True)
class EvalConfig:
    queries: str = ""  # held-out queries for evaluation; empty: the index is not evaluated
    labels: str = ""  # optional Parquet (query_id, doc_id) for label MRR@10 and recall@10
    max_queries: int = 0  # evaluate at most this many queries; 0: all
    nprobe: tuple[int, ...] = (1, 4, 16, 32)  # lists probed in the evaluation sweep
    k: int = 100  # results per query (recall@10 and recall@100 read them)

    def __post_init__(self):
        if self.k < 1 or any(p < 1 for p in self.nprobe):
            raise InputError("eval.k and every eval.nprobe value must be >= 1")


@dataclass(frozen=True)
class RayConfig:
    """How the work is spread: no stage key covers this section, since none of it changes a
    result (2 training workers train exactly as 1 does)."""
    address: str = ""  # Ray cluster to attach to; empty: RAY_ADDRESS, or a local cluster
    num_cpus: int = 0  # local cluster only; 0: max(4, cores, train_workers + 2), so Train's controller gets a slot
    gpus_per_task: float = 0.0  # GPUs per teacher and encode task (and one for init's k-means); 0: CPUs
    # Custom resources that tell the node groups of infra/cluster-aws.yaml apart. In no stage
    # key: placement changes no result.
    gpu_group: str = ""  # teacher and training run only on nodes offering it; empty: any node
    cpu_group: str = ""  # ingest, init, encode, merge, evaluate run only on nodes offering it
    teacher_workers: int = 0  # search workers of the exact top-k (teacher, evaluation); 0: one per GPU, or per node of the GPU group
    train_workers: int = 1  # Ray Train workers (data parallel); 1 runs as a plain Ray task
    train_cpus: int = 1  # CPUs each training worker asks for and computes on (its step, validation and pool assignment)
    train_gpu: bool = False  # one GPU per training worker (needs a CUDA build of torch)
    max_failures: int = 3  # training worker restarts after a lost worker or node; they resume from the last checkpoint
    node_wait_seconds: float = 900.0  # at start, how long to wait for an autoscaler to start a node of each configured group (then exit 2)

    def __post_init__(self):
        if self.gpus_per_task < 0:
            raise InputError("ray.gpus_per_task must be >= 0 (0 runs teacher and encode on CPUs)")
        if self.train_workers < 1 or self.train_cpus < 1 or self.max_failures < 0 or \
                self.teacher_workers < 0 or self.node_wait_seconds < 0:
            raise InputError("ray.train_workers and ray.train_cpus must be >= 1, "
                             "ray.max_failures >= 0 (0: a lost worker fails the job), "
                             "ray.teacher_workers >= 0 (0 picks them from the cluster), "
                             "ray.node_wait_seconds >= 0")


@dataclass(frozen=True)
class PublishConfig:
    # The current version and the one it replaced always stay (docs/operations.md: pruning).
    keep_versions: int = 3  # versions kept, the most recently current first; at least 2
    grace_seconds: float = 600.0  # a version that stopped being current less than this ago stays
    lease_seconds: float = 120.0  # the lease's time to live; renewed every eighth of it
    # Without If-None-Match / If-Match neither the lease nor the pointer swap is safe.
    require_conditional_writes: bool = True  # refuse an S3 store that ignores conditional writes; false: warn

    def __post_init__(self):
        if self.keep_versions < 2 or self.lease_seconds < 8 or self.grace_seconds < 0:
            raise InputError(
                "publish.keep_versions must be >= 2 (the current version and the one it "
                "replaced always stay, since readers may hold either), publish.lease_seconds "
                ">= 8 (a shorter lease cannot fit a storage call inside its margin) and "
                "publish.grace_seconds >= 0")


@dataclass(frozen=True)
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    init: InitConfig = field(default_factory=InitConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)

    def __post_init__(self):
        ix = self.index
        if self.build.fastscan and (ix.nbits != 4 or ix.quantizer != Quantizer.PQ):
            raise InputError(
                f"build.fastscan packs 4-bit PQ codes; this index has index.quantizer="
                f"{ix.quantizer.value} and index.nbits={ix.nbits}: set index.quantizer=pq and "
                f"index.nbits=4 (and index.M to twice the bytes per vector)")
        tr, workers = self.train, self.ray.train_workers
        if tr.batch_size % workers:
            raise InputError(
                f"train.batch_size ({tr.batch_size}) must be divisible by ray.train_workers "
                f"({workers}) so that every worker gets an equal slice of the global batch")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_values(self, changes: dict) -> PipelineConfig:
        """A copy with {"section.field": value} changed; each section checks itself again."""
        by_section: dict[str, dict] = {}
        for name, value in changes.items():
            section, key = name.split(".", 1)
            by_section.setdefault(section, {})[key] = value
        return dataclasses.replace(self, **{
            s: dataclasses.replace(getattr(self, s), **v) for s, v in by_section.items()})

    def hash(self, *sections: str) -> str:
        """Stable hash of the whole config, or of the named sections only."""
        d = self.to_dict()
        if sections:
            d = {s: d[s] for s in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
