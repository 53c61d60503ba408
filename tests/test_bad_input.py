"""Bad input to the core gets a ValueError that names the problem."""

import numpy as np
import pytest

import d2r
from d2r.aggregate import Aggregated, Aggregator, similarity


@pytest.fixture
def book():
    return d2r.Codebook(np.eye(4, dtype=np.float32))


@pytest.mark.parametrize("centroids,match", [
    (np.zeros((0, 4), np.float32), "K = 0"),
    (np.zeros(4, np.float32), "2-D"),
    (np.ones((3, 4), np.int32), "dtype int32"),
    (np.array([[np.nan, 0], [0, 1]], np.float32), "NaN or inf"),
    (np.zeros((3, 0), np.float32), "D = 0"),
])
def test_bad_codebook(centroids, match):
    with pytest.raises(ValueError, match=match):
        d2r.Codebook(centroids)


@pytest.mark.parametrize("x,match", [
    (np.ones((3, 5), np.float32), "expected D=4, got 5"),
    (np.ones((3, 4), np.int64), "dtype int64"),
    (np.ones(4, np.float32), "2-D"),
    (np.ones((2, 2, 4), np.float32), "2-D"),
    (np.array([[0, 0, np.inf, 0]], np.float32), "NaN or inf"),
    (np.array([[0, 0, np.nan, 0]], np.float64), "NaN or inf"),
    (np.array([["a"] * 4]), "dtype"),
])
def test_bad_descriptors(book, x, match):
    with pytest.raises(ValueError, match=match):
        book.assign(x)
    with pytest.raises(ValueError, match=match):
        Aggregator(book, "asmk")(x)


def test_bad_regions(book):
    agg = Aggregator(book, "asmk_star")
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="sum to 2 but there are 3"):
        agg(x, regions=[1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        agg(x, regions=[4, -1])
    with pytest.raises(ValueError, match="integers"):
        agg(x, regions=[1.5, 1.5])


def test_bad_options(book):
    with pytest.raises(ValueError, match="kernel must be one of"):
        Aggregator(book, "vlads")
    with pytest.raises(ValueError, match="num_assignments"):
        Aggregator(book, "asmk", num_assignments=5)
    with pytest.raises(ValueError, match="num_assignments"):
        book.assign(np.ones((1, 4), np.float32), 0)
    with pytest.raises(ValueError, match="VLAD only"):
        Aggregator(book, "asmk", l2_normalize=True)
    with pytest.raises(ValueError, match="assignments"):
        Aggregator(book, "asmk")(np.ones((2, 4), np.float32), assignments=np.array([[0], [9]]))


def test_similarity_mismatch():
    a = Aggregated("asmk", 4, 8, words=np.zeros(0, np.uint32), descriptors=np.zeros((0, 4), np.float32))
    b = Aggregated("asmk_star", 4, 8, words=np.zeros(0, np.uint32), bits=np.zeros((0, 1), np.uint8))
    c = Aggregated("asmk", 4, 9, words=np.zeros(0, np.uint32), descriptors=np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="cannot compare"):
        similarity(a, b)
    with pytest.raises(ValueError, match="differ in shape"):
        similarity(a, c)
    with pytest.raises(ValueError, match="idf"):
        similarity(a, a, idf=np.ones(3))


def test_similarity_of_raw_descriptors_is_a_clear_error():
    """d2r.similarity(x, y) on descriptor arrays raised AttributeError: 'numpy.ndarray' object has no
    attribute 'kernel'."""
    x = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    agg = d2r.Aggregator(d2r.Codebook(np.eye(8, dtype=np.float32)))
    with pytest.raises(TypeError, match="Aggregated records"):
        d2r.similarity(x, agg(x))
    assert d2r.similarity(agg(x), agg(x)) == pytest.approx(1.0)


def test_caller_arrays_untouched(book):
    x = np.array([[0.5, 0.2, 0.1, 0.0]], np.float64)
    before = x.copy()
    Aggregator(book, "asmk")(x)
    np.testing.assert_array_equal(x, before)


def test_codebook_leaves_caller_array_writable(tmp_path):
    c = np.eye(3, dtype=np.float32)
    book = d2r.Codebook(c)
    c[0, 0] = 5.0  # still ours to change, and the codebook keeps its own copy
    assert book.centroids[0, 0] == 1.0
    path = book.save(tmp_path / "cb.npz")
    assert path.stat().st_mode & 0o044  # readable by others, like any file the user writes
