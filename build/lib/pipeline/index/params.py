"""The learned parameters of a quantizer, with a typed description of its structure.

A faiss index is turned into Params (pipeline.index.build.extract_params), a student trains
them (pipeline.quant.model.Student), and they are turned back into a faiss index
(pipeline.index.build.index_from_params).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

from pipeline.config import Quantizer


@dataclass(frozen=True)
class QuantizerSpec:
    """What kind of index the parameters make."""
    kind: Quantizer  # PQ: M sub-quantizers of d/M dims; RQ, LSQ: M full-width additive codebooks
    ivf: bool  # an inverted file in front (IVF-PQ / IVF-RQ); False: one flat code space
    rotation: bool  # an OPQ rotation in front of everything
    M: int
    nbits: int
    beam: int = 1  # RQ only: the encoding beam width

    def __post_init__(self):
        object.__setattr__(self, "kind", Quantizer(self.kind))


@dataclass
class Params:
    """float32 arrays, all in the rotated space:
      centroids (nlist, d): the IVF lists; a flat index has one zero centroid that never moves
      codebooks (M, ksub, d / M) for PQ, (M, ksub, d) for RQ and LSQ: the quantizer of the residual
                x_rot - centroid
      rotation  (d, d) or None: x_rot = x @ rotation.T (faiss OPQMatrix.A)
    """
    spec: QuantizerSpec
    centroids: np.ndarray
    codebooks: np.ndarray
    rotation: np.ndarray | None = None

    def __post_init__(self):
        M, ksub, dsub = self.codebooks.shape
        d = self.centroids.shape[1]
        assert (M, ksub) == (self.spec.M, 1 << self.spec.nbits), "codebooks disagree with spec"
        additive = self.spec.kind.additive
        assert dsub == (d if additive else d // M) and (additive or M * dsub == d), \
            "codebooks must tile d"
        assert (self.rotation is not None) == self.spec.rotation, "rotation disagrees with spec"
        assert self.spec.ivf or len(self.centroids) == 1, "a flat index has one centroid"

    def arrays(self) -> dict:
        """{name: array} for np.savez; from_arrays reads it back."""
        out = {"spec": np.array(json.dumps(dataclasses.asdict(self.spec))),
               "centroids": self.centroids, "codebooks": self.codebooks}
        if self.rotation is not None:
            out["rotation"] = self.rotation
        return out

    @classmethod
    def from_arrays(cls, arrays: dict) -> Params:
        return cls(QuantizerSpec(**json.loads(str(arrays["spec"]))), arrays["centroids"],
                   arrays["codebooks"], arrays.get("rotation"))
