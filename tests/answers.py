"""Comparing two searches by what a search defines.

Two indexes with the same codes answer with the same distances rank by rank, but where
distances tie (4-bit codes, duplicate codes, equal sums of look-up-table entries) the ids at
those ranks depend on the order in which each index visits its lists and their entries, which
faiss leaves open. So: distances equal rank by rank; ids equal where the distance is not tied;
a run of tied ranks that ends inside the list holds the same set of ids; the last run (which
may tie with ranks past k that neither search shows) only has to hold distinct ids.
"""
from __future__ import annotations

import numpy as np


def _tied(d: np.ndarray, tol: float) -> np.ndarray:
    """Per rank, whether its distance ties with a neighbouring rank's (within tol)."""
    same = np.abs(np.diff(d)) <= tol
    out = np.zeros(len(d), dtype=bool)
    out[1:] |= same
    out[:-1] |= same
    return out


def assert_same_answers(got, want, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """got and want are (D, I) pairs from two searches of the same queries."""
    Dg, Ig = (np.asarray(a) for a in got)
    Dw, Iw = (np.asarray(a) for a in want)
    assert Dg.shape == Dw.shape == Ig.shape == Iw.shape, (Dg.shape, Dw.shape)
    np.testing.assert_allclose(Dg, Dw, rtol=rtol, atol=atol)
    k = Dw.shape[1]
    for r in range(len(Dw)):
        d = Dw[r].astype(np.float64)
        tol = atol + rtol * np.abs(d).max(initial=0.0)
        tied = _tied(d, tol)
        # The last run may tie with ranks past k, which neither search shows.
        last = k - 1
        while last > 0 and abs(d[last - 1] - d[k - 1]) <= tol:
            last -= 1
        tied[last:] = True
        np.testing.assert_array_equal(Ig[r][~tied], Iw[r][~tied], err_msg=f"query {r}")
        j = 0
        while j < k:  # each run of tied ranks
            if not tied[j]:
                j += 1
                continue
            end = j
            while end + 1 < k and abs(d[end + 1] - d[end]) <= tol:
                end += 1
            a, b = set(Ig[r, j:end + 1].tolist()), set(Iw[r, j:end + 1].tolist())
            if end + 1 < k:
                assert a == b, f"query {r}, ranks {j}..{end}: {sorted(a)} != {sorted(b)}"
            else:  # cut by k: either side may hold any of the tied ids (-1: no result)
                for ids in (Ig[r, j:], Iw[r, j:]):
                    found = ids[ids >= 0]
                    assert len(set(found.tolist())) == len(found), f"query {r}: duplicate ids"
                assert (Ig[r, j:] < 0).sum() == (Iw[r, j:] < 0).sum(), f"query {r}: padding"
            j = end + 1
