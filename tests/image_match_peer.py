"""Runs under the Python of ``D2R_IMAGE_MATCH_PYTHON`` (a venv with ``image-match`` 1.1.2), never imported by
the test suite: ``python tests/image_match_peer.py IN.npz OUT.npz``.

IN holds ``image_<i>`` (H, W, 3) uint8 RGB arrays (decoded by d2r, so both sides see the same pixels) and
optionally ``paths`` (image files, read by image-match itself: ``file_signatures``). OUT gets,
from image-match itself: ``signatures`` (n, 648) int8 (``ImageSignature().generate_signature(array)``),
``words`` (n, 63) int64 (``get_words`` + ``max_contrast`` + ``words_to_int`` with SignatureDatabase's k=16,
N=63) ``distances`` (n, n) float64 (``normalized_distance`` of each signature to all) and ``seconds``
(the signatures' time).

Shim: image-match 1.1.2 pins scikit-image < 0.13, which does not build on current Pythons; its array path
(``rgb2gray``) works with a current scikit-image unchanged, and only its file path uses the removed
``imread(as_grey=...)``, which this harness does not call.
"""

import sys
import time

import numpy as np
from image_match.goldberg import ImageSignature
from image_match.signature_database_base import get_words, max_contrast, normalized_distance, words_to_int


def main(src: str, dst: str) -> None:
    data = np.load(src)
    images = [data[f"image_{i}"] for i in range(len([f for f in data.files if f.startswith("image_")]))]
    paths = [str(p) for p in data["paths"]] if "paths" in data.files else []
    gis = ImageSignature()
    t0 = time.perf_counter()
    sigs = np.stack([gis.generate_signature(a) for a in images]) if images else np.zeros((0, 648), np.int8)
    seconds = time.perf_counter() - t0
    words = []
    for s in sigs:
        w = get_words(s, 16, 63)
        max_contrast(w)
        words.append(words_to_int(w))
    words = np.array(words, np.int64).reshape(len(sigs), 63)
    dist = np.stack([normalized_distance(sigs, s) for s in sigs]) if len(sigs) else np.zeros((0, 0))
    # image files through image-match's own decoding (its bytestream path: Pillow, converted to RGB)
    files = [gis.generate_signature(open(p, "rb").read(), bytestream=True) for p in paths]
    file_sigs = np.stack(files) if files else np.zeros((0, 648), np.int8)
    np.savez(dst, signatures=sigs, words=words, distances=dist, seconds=seconds, file_signatures=file_sigs)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
