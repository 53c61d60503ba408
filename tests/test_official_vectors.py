"""Every value of shared/reference/d2r_official_vectors.json, reproduced to 1e-6."""

import json

import numpy as np
import pytest

import d2r
from d2r.aggregate import Aggregated, Aggregator, similarity

pytestmark = pytest.mark.dev  # reads shared/reference/d2r_official_vectors.json

KERNEL = {"vlad": "vlad", "rvlad": "vlad", "asmk": "asmk", "rasmk": "asmk", "asmk_star": "asmk_star",
          "rasmk_star": "asmk_star"}


@pytest.fixture(scope="module")
def vectors(shared):
    return json.loads((shared / "reference" / "d2r_official_vectors.json").read_text())


def _inputs(vectors, regions):
    features = np.array(vectors["features"], np.float32)
    if regions is None:
        return features
    # Non-empty regions take the fixture's feature sets in order: `features`, then `second_region_features`.
    sets = iter([features, np.array(vectors["second_region_features"], np.float32)])
    return np.concatenate([next(sets) if n else np.zeros((0, 2), np.float32) for n in regions])


def test_every_extraction_case(vectors):
    codebook = d2r.Codebook(np.array(vectors["codebook"], np.float32))
    assert len(vectors["extraction"]) >= 11
    for case in vectors["extraction"]:
        kernel = KERNEL[case["kernel"]]
        kw = {"l2_normalize": case["l2"]} if kernel == "vlad" else {}
        agg = Aggregator(codebook, kernel, case["num_assignments"], **kw)
        result = agg(_inputs(vectors, case["regions"]), regions=case["regions"])
        msg = case["case"]
        if kernel == "vlad":
            np.testing.assert_allclose(result.vector, case["expected"], atol=1e-6, err_msg=msg)
            continue
        np.testing.assert_array_equal(result.words, case["expected_words"], err_msg=msg)
        if kernel == "asmk":
            np.testing.assert_allclose(result.descriptors, case["expected_descriptors"], atol=1e-6, err_msg=msg)
        else:
            np.testing.assert_array_equal(result.bits, case["expected_packed_bits"], err_msg=msg)


def _record(kernel, words, values, dim):
    words = np.array(words, np.uint32)
    if kernel == "asmk":
        return Aggregated("asmk", dim, 5, words=words, descriptors=np.array(values, np.float32))
    return Aggregated("asmk_star", dim, 5, words=words, bits=np.array(values, np.uint8))


def test_every_similarity_case(vectors):
    cases = vectors["similarity"]
    assert len(cases) >= 5
    for case in cases:
        kernel = case["kernel"]
        if kernel == "vlad":
            a = Aggregated("vlad", 5, 1, vector=np.array(case["a"], np.float32))
            b = Aggregated("vlad", 5, 1, vector=np.array(case["b"], np.float32))
            assert similarity(a, b) == pytest.approx(case["expected"], abs=1e-6)
        elif "a_words" not in case:  # either side without visual words
            empty = _record(kernel, [], np.zeros((0, 2)), 2)
            full = _record(kernel, [1], [[1.0, 0.0]], 2)
            assert similarity(empty, full) == case["expected"]
            assert similarity(full, empty) == case["expected"]
            assert similarity(empty, empty) == case["expected"]
        else:
            key = "descriptors" if kernel == "asmk" else "packed_bits"
            dim = case.get("dimensionality", 2)
            a = _record(kernel, case["a_words"], case[f"a_{key}"], dim)
            b = _record(kernel, case["b_words"], case[f"b_{key}"], dim)
            got = similarity(a, b, alpha=case["alpha"], tau=case["tau"], normalize=case["l2"])
            assert got == pytest.approx(case["expected"], abs=1e-6), case["case"]
