"""faiss index construction: the k-means-trained baseline, and the round trip between a
faiss index and its learned parameters (pipeline.index.params.Params).

IndexConfig.nlist == 0 asks for a flat PQ/OPQ/RQ/LSQ structure (benchmarks; the pipeline's on-disk
index always has IVF).
"""
from __future__ import annotations

import faiss
import numpy as np

from pipeline.config import Coarse, IndexConfig, Kmeans, Quantizer
from pipeline.errors import InputError
from pipeline.index.params import Params, QuantizerSpec

# the flat (list-less) forms of the codecs
FLAT_CODECS = (faiss.IndexPQ, faiss.IndexResidualQuantizer, faiss.IndexLocalSearchQuantizer)


def faiss_metric(metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def check_shape(cfg: IndexConfig, d: int, n_train: int) -> None:
    """User-facing checks that need the data's dimension and the training sample size."""
    if cfg.quantizer == "pq" and d % cfg.M:
        divisors = [m for m in range(1, d + 1) if d % m == 0 and m <= 64]
        raise InputError(
            f"index.M={cfg.M} does not divide the dimension d={d}; choose one of {divisors}"
        )
    need = max(cfg.nlist, 1 << cfg.nbits)
    if n_train < need:
        raise InputError(
            f"{n_train} training vectors are fewer than the {need} centroids to learn "
            f"(index.nlist={cfg.nlist}, 2**index.nbits={1 << cfg.nbits}); lower them"
        )


def ivfpq_of(index):
    """The IndexIVFPQ, IndexIVFResidualQuantizer or IndexIVFLocalSearchQuantizer inside `index`
    (which may sit behind a pre-transform)."""
    return faiss.downcast_index(faiss.extract_index_ivf(index))


def _codec(cfg: IndexConfig) -> str:
    return f"{str(cfg.quantizer).upper()}{cfg.M}x{cfg.nbits}"


def train_baseline(xt: np.ndarray, cfg: IndexConfig, niter: int = 20, seed: int = 0,
                   use_gpu: bool = False, opq_niter: int = 50, metric: str = "ip",
                   kmeans: Kmeans = Kmeans.FLAT, opq_points: int = 65536):
    """faiss's own k-means IVF + PQ (+ OPQ) trained on xt: the baseline and the warm start.

    use_gpu (with faiss-gpu and a GPU): the coarse k-means, the slow step at scale (nlist
    65,536 on a 1M sample), assigns points on every GPU; faiss's algorithm, seed and
    iterations are unchanged. Without GPUs in this faiss it trains on the CPU. opq_niter: the
    OPQ rotation's alternating iterations (faiss's default 50), opq_points the sample vectors
    it trains on (faiss's default 65,536). metric: data.metric. kmeans:
    init.kmeans; two-level clusters on the CPU (with GPUs, flat k-means runs there)."""
    d = xt.shape[1]
    key = _codec(cfg)
    if cfg.nlist:
        key = f"IVF{cfg.nlist},{key}"
    if cfg.opq:
        key = f"OPQ{cfg.M},{key}"
    index = faiss.index_factory(d, key, faiss_metric(metric))
    codec = ivfpq_of(index) if cfg.nlist else faiss.downcast_index(_inner(index))
    if cfg.nlist:
        codec.cp.niter = niter
        codec.cp.seed = seed
        if use_gpu and hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0:
            flat = faiss.IndexFlat(d, faiss_metric(metric))
            codec.clustering_index = faiss.index_cpu_to_all_gpus(flat)
    if hasattr(codec, "do_polysemous_training"):
        # Polysemous training only reorders each codebook so that Hamming distances between
        # codes approximate the true ones, for polysemous search, which nothing here uses; ADC
        # search is unchanged by it, and it takes most of the warm start's time.
        codec.do_polysemous_training = False
    if cfg.quantizer == Quantizer.RQ:
        codec.rq.max_beam_size = cfg.rq_beam
        codec.rq.cp.seed = seed
    elif cfg.quantizer == Quantizer.LSQ:
        codec.lsq.random_seed = seed
    else:
        codec.pq.cp.seed = seed
    xt = np.ascontiguousarray(xt, dtype=np.float32)
    if cfg.opq:
        opq = faiss.downcast_VectorTransform(index.chain.at(0))
        opq.niter, opq.max_train_points = opq_niter, opq_points
    if cfg.nlist and kmeans == Kmeans.TWO_LEVEL and codec.clustering_index is None:
        _two_level(index, codec, xt, niter, seed, metric)
    index.train(xt)
    if cfg.nlist and cfg.coarse == Coarse.HNSW:  # the same parameters, another assignment
        return index_from_params(extract_params(index), metric, cfg.coarse)
    return index


def _two_level(index, codec, xt: np.ndarray, niter: int, seed: int, metric: str) -> None:
    """Fills the IVF's coarse quantizer with faiss's two-level clustering of xt (in the OPQ
    rotation's space, which it trains first): index.train then skips k-means (a quantizer
    holding nlist centroids needs no training) and trains the codes on the residuals."""
    from faiss.contrib.clustering import two_level_clustering

    x = xt
    if isinstance(index, faiss.IndexPreTransform):
        rotation = index.chain.at(0)
        rotation.train(x)
        x = rotation.apply(x)
    # niter for the first level; the second level's small problems take faiss's default 25
    centroids, _ = two_level_clustering(x, int(np.sqrt(codec.nlist)), codec.nlist,
                                        clustering_niter=niter, seed=seed,
                                        spherical=metric == "ip")
    codec.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))


def _inner(index):
    return index.index if isinstance(index, faiss.IndexPreTransform) else index


def extract_params(index) -> Params:
    """The parameters of a trained faiss index (IVF or flat, PQ, RQ or LSQ, OPQ or not)."""
    inner = faiss.downcast_index(_inner(index))
    flat = isinstance(inner, FLAT_CODECS)
    if flat:
        codec = inner
        centroids = np.zeros((1, inner.d), np.float32)
    else:
        codec = ivfpq_of(index)
        quantizer = faiss.downcast_index(codec.quantizer)
        centroids = quantizer.reconstruct_n(0, codec.nlist).astype(np.float32)
    if hasattr(codec, "rq"):
        rq = codec.rq
        nbits, beam, kind = rq.nbits.at(0), rq.max_beam_size, Quantizer.RQ
        codebooks = faiss.vector_to_array(rq.codebooks).reshape(rq.M, 1 << nbits, rq.d)
    elif hasattr(codec, "lsq"):
        lsq = codec.lsq
        nbits, beam, kind = lsq.nbits.at(0), 1, Quantizer.LSQ
        codebooks = faiss.vector_to_array(lsq.codebooks).reshape(lsq.M, 1 << nbits, lsq.d)
    else:
        pq = codec.pq
        nbits, beam, kind = pq.nbits, 1, Quantizer.PQ
        codebooks = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
    rotation = None
    if isinstance(index, faiss.IndexPreTransform):
        lt = faiss.downcast_VectorTransform(index.chain.at(0))
        rotation = faiss.vector_to_array(lt.A).reshape(lt.d_out, lt.d_in)
    spec = QuantizerSpec(kind, not flat, rotation is not None, len(codebooks), nbits, beam)
    return Params(spec, centroids, codebooks.astype(np.float32), rotation)


def index_from_params(params: Params, metric: str, coarse: Coarse = Coarse.FLAT):
    """A trained, empty IndexIVFPQ, IndexIVFResidualQuantizer or IndexIVFLocalSearchQuantizer
    (or their flat forms) behind an OPQMatrix if a rotation is given; `coarse` is the
    quantizer over its centroids."""
    spec, C = params.spec, params.centroids
    nlist, d = C.shape
    M, nbits = spec.M, spec.nbits
    codebooks = np.ascontiguousarray(params.codebooks, dtype=np.float32).ravel()
    if spec.kind.additive:
        ivf = _additive_index(spec, C, codebooks, metric, coarse)
    elif not spec.ivf:
        ivf = faiss.IndexPQ(d, M, nbits, faiss_metric(metric))
        faiss.copy_array_to_vector(codebooks, ivf.pq.centroids)
        ivf.is_trained = True
    else:
        quantizer = coarse_quantizer(C, metric, coarse)
        ivf = faiss.IndexIVFPQ(quantizer, d, nlist, M, nbits, faiss_metric(metric))
        faiss.copy_array_to_vector(codebooks, ivf.pq.centroids)
        ivf.is_trained = True
        ivf.own_fields = True
        quantizer.this.disown()
        if metric == "l2":
            ivf.precompute_table()
    if params.rotation is None:
        return ivf
    opq = opq_matrix(params.rotation, M)
    index = faiss.IndexPreTransform(opq, ivf)
    index.own_fields = True
    ivf.this.disown()
    opq.this.disown()
    return index


def to_fastscan(index, bbs: int = 32):
    """A 4-bit IVF-PQ (behind its OPQ rotation, if any) as faiss IndexIVFPQFastScan: the same
    centroids and codebooks, and the same codes and ids (if it holds any, from any inverted
    lists, on-disk ones included), packed in blocks of `bbs` and searched with 8-bit
    quantized look-up tables in SIMD registers. The result owns all it refers to: `index`
    may be dropped. It holds its codes in memory (faiss has no on-disk fast-scan lists)."""
    inner = faiss.downcast_index(_inner(index))
    if not isinstance(inner, faiss.IndexIVFPQ) or inner.pq.nbits != 4:
        raise InputError("fast-scan takes a 4-bit IVF-PQ (index.nbits=4)")
    fs = faiss.IndexIVFPQFastScan(inner, bbs)  # packs the lists; shares the quantizer
    # Not clone_index: it would copy every packed list once more. The coarse quantizer is
    # small; own a copy of it, and forget the source lists the constructor remembers.
    quantizer = faiss.clone_index(inner.quantizer)
    fs.quantizer = quantizer
    fs.own_fields = True
    quantizer.this.disown()
    fs.orig_invlists = None
    if not isinstance(index, faiss.IndexPreTransform):
        return fs
    vt = faiss.downcast_VectorTransform(index.chain.at(0))
    opq = opq_matrix(faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in), inner.pq.M)
    out = faiss.IndexPreTransform(opq, fs)
    out.own_fields = True
    fs.this.disown()
    opq.this.disown()
    return out


# The HNSW coarse quantizer: 32 links per centroid as faiss's IVF..._HNSW32. A search visits
# max(efSearch, nprobe) candidates; 64 finds the nearest centroid as the exact quantizer
# does for all but about 1 vector in 1,000 (docs/scale.md).
HNSW_M, HNSW_EF_SEARCH, HNSW_EF_CONSTRUCTION = 32, 64, 80


def coarse_quantizer(C: np.ndarray, metric: str, coarse: Coarse = Coarse.FLAT):
    """The index over the centroids C that assigns vectors to lists."""
    d = C.shape[1]
    if coarse == Coarse.HNSW:
        quantizer = faiss.IndexHNSWFlat(d, HNSW_M, faiss_metric(metric))
        quantizer.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        quantizer.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        quantizer = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    quantizer.add(np.ascontiguousarray(C, dtype=np.float32))
    return quantizer


def _additive_index(spec: QuantizerSpec, C: np.ndarray, codebooks: np.ndarray, metric: str,
                    coarse: Coarse = Coarse.FLAT):
    """An RQ or LSQ index, IVF or flat, with the given codebooks, searched as faiss's factory
    sets them up (look-up tables for ip, decoding for l2: no norm bytes). faiss encodes what
    is added: RQ greedily or with spec.beam, LSQ with its own ICM search."""
    d = C.shape[1]
    M, nbits, metric_type = spec.M, spec.nbits, faiss_metric(metric)
    search = faiss.AdditiveQuantizer.ST_LUT_nonorm if metric == "ip" \
        else faiss.AdditiveQuantizer.ST_decompress
    rq = spec.kind == Quantizer.RQ
    if not spec.ivf:
        index = (faiss.IndexResidualQuantizer if rq else faiss.IndexLocalSearchQuantizer)(
            d, M, nbits, metric_type, search)
    else:
        quantizer = coarse_quantizer(C, metric, coarse)
        index = (faiss.IndexIVFResidualQuantizer if rq else faiss.IndexIVFLocalSearchQuantizer)(
            quantizer, d, C.shape[0], M, nbits, metric_type, search)
        index.own_fields = True
        quantizer.this.disown()
    aq = index.rq if rq else index.lsq
    faiss.copy_array_to_vector(codebooks, aq.codebooks)
    if rq:
        aq.max_beam_size = spec.beam
    aq.is_trained = True
    aq.compute_codebook_tables()
    index.is_trained = True
    return index


def opq_matrix(rotation: np.ndarray, M: int) -> faiss.OPQMatrix:
    """A trained OPQMatrix applying x @ rotation.T."""
    opq = faiss.OPQMatrix(rotation.shape[1], M)
    faiss.copy_array_to_vector(np.ascontiguousarray(rotation, dtype=np.float32).ravel(), opq.A)
    opq.is_trained = True
    return opq


def set_nprobe(index, nprobe: int) -> None:
    """Sets nprobe on an IVF index; a flat PQ index has no lists and ignores it."""
    if not isinstance(faiss.downcast_index(_inner(index)), FLAT_CODECS):
        faiss.extract_index_ivf(index).nprobe = nprobe


def bytes_per_vector(cfg: IndexConfig) -> int:
    return cfg.M * cfg.nbits // 8
