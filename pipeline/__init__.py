"""Learned, retrieval-oriented vector quantization on Ray: distilled IVF/PQ/OPQ, FAISS indexes."""
import logging

logging.getLogger("pipeline").addHandler(logging.NullHandler())
