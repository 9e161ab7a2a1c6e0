"""Learned, retrieval-oriented vector quantization on Ray: distil IVF/PQ/OPQ, build FAISS indexes."""
import logging

logging.getLogger("pipeline").addHandler(logging.NullHandler())
