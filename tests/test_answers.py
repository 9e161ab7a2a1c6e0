"""The comparison the suite uses for two searches (tests/answers.py): it accepts what faiss
leaves open (the order of tied ids, the last run that may tie past k, -1 padding) and
nothing else."""
import numpy as np
import pytest

from .answers import assert_same_answers

D = np.array([[5.0, 4, 4, 3, 2, 2]])
I = np.array([[1, 2, 3, 4, 5, 6]])


@pytest.mark.parametrize("other", [[1, 3, 2, 4, 6, 5], [1, 2, 3, 4, 5, 9], [1, 2, 3, 4, 9, 8]])
def test_ties_and_the_last_run_may_differ(other):
    assert_same_answers((D, I), (D, np.array([other])))


@pytest.mark.parametrize("other", [[2, 1, 3, 4, 5, 6], [1, 2, 3, 9, 5, 6], [1, 2, 7, 4, 5, 6],
                                   [1, 2, 3, 4, 5, 5]])
def test_anything_else_fails(other):
    with pytest.raises(AssertionError):
        assert_same_answers((D, I), (D, np.array([other])))


def test_distances_must_agree_and_padding_counts():
    with pytest.raises(AssertionError):
        assert_same_answers((D + 1e-3, I), (D, I))
    Dp, Ip = np.array([[5.0, 4, -3e38, -3e38]]), np.array([[1, 2, -1, -1]])
    assert_same_answers((Dp, Ip), (Dp, Ip))
    with pytest.raises(AssertionError):
        assert_same_answers((Dp, Ip), (Dp, np.array([[1, 2, 7, -1]])))
