"""Region stage on the dev photos: boxes, features and time per image for each proposer and both modes.

    PYTHONPATH=. python benchmarks/bench_regions.py [--limit 50] [--max-side 1024] [--json]

Prints, per proposer (none / grid / density) and mode (re-extraction on crops, the official way, vs
assigning whole-image features to boxes): regions per image, local features per image summed over regions
(what a regional-search index stores; R-ASMK* stores one aggregate per image), seconds per image, detector
failures. Features: ``d2r.features.RootSIFT`` when available, else plain OpenCV SIFT (same keypoints).

The retrieval table (Medium / Hard mAP of ASMK*, R-ASMK* and regional search with each proposer, index size
and time) is ``python -m benchmarks.run dev`` (benchmarks/results/dev.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from d2r.detect import extract_regions, get_proposer
from d2r.features.base import LocalFeatures

REPO = Path(__file__).resolve().parents[1]


class _OpenCVSift:
    """Fallback extractor until d2r.features.RootSIFT lands: OpenCV SIFT, L2-normalised descriptors."""

    dim = 128

    def __init__(self, max_features=1000):
        self.max_features = max_features

    def extract(self, image):
        import cv2

        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
        if min(gray.shape[:2]) < 10:
            return LocalFeatures.empty(self.dim)
        sift = cv2.SIFT_create(nfeatures=self.max_features)
        kps, desc = sift.detectAndCompute(np.ascontiguousarray(gray), None)
        if desc is None or not kps:
            return LocalFeatures.empty(self.dim)
        desc = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
        return LocalFeatures(np.array([k.pt for k in kps], np.float32),
                             np.array([k.size for k in kps], np.float32),
                             np.array([k.response for k in kps], np.float32), desc.astype(np.float32))


def make_extractor():
    try:
        from d2r.features import RootSIFT  # lands with the features branch
    except ImportError:
        return _OpenCVSift(), "opencv-sift (fallback)"
    return RootSIFT(), "RootSIFT"


def load_images(data: Path, limit: int, max_side: int):
    from PIL import Image

    names = json.loads((data / "gnd.json").read_text())["imlist"][:limit]
    for name in names:
        im = Image.open(data / name).convert("RGB")
        im.thumbnail((max_side, max_side))
        yield name, np.asarray(im)


def region_rows(images, extractor, proposers):
    rows = []
    for pname in proposers:
        proposer = get_proposer(pname)
        for reextract in ([True] if pname == "none" else [True, False]):
            n_regions, n_feats, failures, seconds = [], [], 0, 0.0
            for name, image in images:
                t0 = time.perf_counter()
                rf = extract_regions(image, extractor, proposer, reextract=reextract, name=name)
                seconds += time.perf_counter() - t0
                n_regions.append(rf.num_regions)
                n_feats.append(len(rf.features))
                failures += int(rf.failed)
            rows.append({
                "proposer": pname, "mode": "reextract" if reextract else "assign",
                "regions_per_image": float(np.mean(n_regions)), "features_per_image": float(np.mean(n_feats)),
                "seconds_per_image": seconds / len(images), "detector_failures": failures,
            })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "instance_bench_dev")
    parser.add_argument("--limit", type=int, default=50, help="number of dev photos (database order)")
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--proposers", default="none,grid,density")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    extractor, ename = make_extractor()
    images = list(load_images(args.data, args.limit, args.max_side))
    rows = region_rows(images, extractor, args.proposers.split(","))
    if args.json:
        print(json.dumps({"extractor": ename, "images": len(images), "max_side": args.max_side, "rows": rows},
                         indent=2))
        return 0
    print(f"{len(images)} dev photos, longer side <= {args.max_side}, extractor {ename}")
    print(f"{'proposer':<10}{'mode':<11}{'regions/img':>12}{'features/img':>14}{'s/img':>8}{'failed':>8}")
    for r in rows:
        print(f"{r['proposer']:<10}{r['mode']:<11}{r['regions_per_image']:>12.2f}"
              f"{r['features_per_image']:>14.1f}{r['seconds_per_image']:>8.3f}{r['detector_failures']:>8d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
