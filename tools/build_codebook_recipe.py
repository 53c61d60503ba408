#!/usr/bin/env python
"""Build a codebook from a recipe file (codebooks/recipes/*.yaml): the exact, repeatable way shipped codebooks
are made.

Recipe keys: out, feature (rootsift|delf), model / pca (optional), exactly one source — ``skimage`` (names of
scikit-image sample images), ``images`` (folder or list file) or ``store`` (feature-store folder) — and the
training settings size, seed, iterations, method, init, sample_per_image, max_samples, trainset.

    PYTHONPATH=. python tools/build_codebook_recipe.py codebooks/recipes/rootsift-128d-k256-skimage-s0.yaml
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from d2r.codebook.kmeans import load_training_descriptors, sample_descriptors
from d2r.codebook import train_codebook

KNOWN = {"out", "feature", "model", "pca", "skimage", "images", "store", "size", "seed", "iterations",
         "method", "init", "sample_per_image", "max_samples", "trainset"}


def skimage_descriptors(names, feature, model, pca, per_image, max_total, seed, progress):
    import skimage.data

    from d2r.features import get_extractor

    extractor = get_extractor(feature, model=model, pca=pca)
    feats = {name: extractor.extract(getattr(skimage.data, name)()) for name in names}
    x, info = sample_descriptors(feats, per_image=per_image, max_total=max_total, seed=seed,
                                 progress=progress)
    pca_obj = getattr(extractor, "pca", None)
    ex_info = extractor.info() if hasattr(extractor, "info") else {"name": extractor.name, "config": {},
                                                                   "fingerprint": extractor.fingerprint()}
    meta = {"feature": ex_info["name"], "feature_config": ex_info.get("config", {}),
            "feature_fingerprint": ex_info["fingerprint"],
            "training_source": "skimage.data:" + ",".join(names),
            "training_images": info["images_used"], "training_descriptors_seen": info["descriptors_seen"],
            "samples": info["samples"]}
    if pca_obj is not None:
        meta["pca_fingerprint"] = pca_obj.fingerprint()
    return x, meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Build a codebook from a recipe file.")
    p.add_argument("recipe")
    p.add_argument("--out", help="override the recipe's output path")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO)
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    unknown = set(recipe) - KNOWN
    if unknown:
        raise SystemExit(f"{args.recipe}: unknown keys {sorted(unknown)}")
    out = Path(args.out or recipe["out"])
    if out.exists() and not args.force:
        raise SystemExit(f"{out} exists; pass --force to overwrite it")
    feature = recipe.get("feature", "rootsift")
    seed = int(recipe.get("seed", 0))
    common = dict(per_image=int(recipe.get("sample_per_image", 300)),
                  max_total=int(recipe.get("max_samples", 1_000_000)), seed=seed, progress=not args.quiet)
    if "skimage" in recipe:
        x, meta = skimage_descriptors(recipe["skimage"], feature, recipe.get("model"), recipe.get("pca"),
                                      **common)
    else:
        x, meta = load_training_descriptors(store=recipe.get("store"), images=recipe.get("images"),
                                            feature=feature, model=recipe.get("model"), pca=recipe.get("pca"),
                                            **common)
    meta["trainset"] = recipe.get("trainset", meta.get("training_source"))
    meta["recipe"] = recipe
    book, info = train_codebook(x, int(recipe["size"]), iterations=int(recipe.get("iterations", 20)),
                                method=recipe.get("method", "lloyd"), init=recipe.get("init", "auto"),
                                seed=seed, progress=not args.quiet, metadata=meta)
    book.save(out)
    print(json.dumps({"out": str(out), "k": book.size, "D": book.dim, "samples": info["samples"],
                      "iterations": info["iterations"], "inertia": info["final_inertia"],
                      "fingerprint": book.fingerprint}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
