"""``d2r train-codebook``: train a k-means visual-word codebook from a feature store, images or
descriptors."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from d2r.build import check_codebook_plan
from d2r.cli import UsageError
from d2r.codebook import train_codebook
from d2r.codebook.config import CodebookConfig
from d2r.codebook.codebook import check_training_size
from d2r.codebook.kmeans import load_training_descriptors
from d2r.distributed import sample_descriptors, train_codebook as train_ray
from d2r.distributed import session
from d2r.features import get_extractor, list_images

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train-codebook", help="train a k-means codebook (visual words)",
        description="Train a k-means codebook on sampled local descriptors and write it as a d2r .npz "
                    "(centroids + provenance metadata). See codebooks/README.md for naming and recipes.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", metavar="STORE", help="feature store folder (made by `d2r extract`)")
    src.add_argument("--images", metavar="DIR_OR_LIST",
                     help="image folder (searched recursively) or list file; features extracted on the fly "
                          "(an image that fails is logged and skipped)")
    src.add_argument("--descriptors", metavar="FILE.npy", help="(N, D) float32 descriptors (.npy)")
    p.add_argument("--features", choices=("rootsift", "delf"),
                   help="feature type (--images: extractor to run, default rootsift; --store: must match the "
                        "store; --descriptors: recorded, and D checked for rootsift)")
    p.add_argument("--model", metavar="PATH", help="DELF SavedModel folder (--features delf)")
    p.add_argument("--pca", metavar="PATH", help="PCA parameters folder for the extractor")
    p.add_argument("--dim", type=int, metavar="D", help="expected descriptor dimensionality D (checked)")
    p.add_argument("--size", "-k", type=int, required=True, metavar="K",
                   help="number of visual words (needs at least 4 training descriptors per word)")
    p.add_argument("--out", required=True, metavar="FILE", help="output codebook .npz (written atomically)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the descriptor sample, the seeding and the mini-batches: the same "
                        "seed and inputs give the same codebook (0)")
    p.add_argument("--iterations", type=int, default=20, metavar="N",
                   help="Lloyd iterations / mini-batch epochs (default 20; stops early once converged)")
    p.add_argument("--method", choices=("lloyd", "minibatch"), default="lloyd",
                   help="lloyd: exact assignment and mean update every iteration, inertia never increases "
                        "(default); minibatch: Sculley's mini-batch updates, cheaper per pass, slightly "
                        "higher inertia")
    p.add_argument("--init", choices=("auto", "k-means||", "k-means++", "random"), default="auto",
                   help="starting centroids. k-means||: Bahmani et al.'s k-means‖ (5 oversampling passes, "
                        "then k-means++ on the ~2.5K candidates), about 5 Lloyd iterations; k-means++: "
                        "scikit-learn's, ~150 Lloyd iterations at K 1,024 on 100k descriptors; random: K "
                        "distinct descriptors, free, but higher inertia at large K. Seeding looks at a "
                        "sample of at most 100,000 descriptors. auto (default): k-means|| at every K")
    p.add_argument("--batch-size", type=int, metavar="N", help="--method minibatch: batch size (default "
                                                               "max(8192, 2K))")
    p.add_argument("--sample-per-image", type=int, default=300, metavar="N",
                   help="descriptors sampled per image (default 300; fewer when --max-samples / images is "
                        "smaller, so that every image contributes evenly)")
    p.add_argument("--max-samples", type=int, default=1_000_000, metavar="N",
                   help="cap on training descriptors (default 1,000,000)")
    p.add_argument("--trainset", metavar="NAME",
                   help="training-set name recorded in the metadata (default: the source path)")
    p.add_argument("--checkpoint", metavar="PATH", help="checkpoint file, written every iteration; resumed "
                                                         "from when it exists")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run the Lloyd assignment step on Ray workers: a cluster address ('auto' = the one "
                        "`ray start` runs here, HOST:PORT), or none to start a local Ray on this machine "
                        "(needs pip install -e '.[ray]')")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    p.set_defaults(func=run)


def _expected_dim(args) -> int | None:
    if args.dim is not None:
        if args.dim < 1:
            raise UsageError(f"--dim must be positive, got {args.dim}")
        return args.dim
    if args.descriptors is not None and args.features == "rootsift":
        if args.pca is None:
            return 128

        return int(get_extractor("rootsift", pca=args.pca).dim)
    return None


def _train(args, ray: bool):
    """Sample, then train; with ``ray`` the sampling (store or images) and Lloyd's assignment on Ray."""
    from functools import partial


    progress = not args.quiet
    sampler, train = None, train_codebook
    if ray:
        spec = {"name": args.features or "rootsift", "model": args.model, "pca": args.pca, "options": {}}
        sampler = partial(sample_descriptors, features=spec)
        train = train_ray
    x, meta = load_training_descriptors(
        store=args.store, images=args.images, descriptors=args.descriptors, feature=args.features,
        model=args.model, pca=args.pca, dim=_expected_dim(args), per_image=args.sample_per_image,
        max_total=args.max_samples, seed=args.seed, progress=progress, sampler=sampler)
    check_training_size(x.shape[0], args.size, "--size")
    if args.trainset:
        meta["trainset"] = args.trainset
    log.info("training K=%d on %d descriptors of D=%d", args.size, x.shape[0], x.shape[1])
    book, info = train(x, args.size, iterations=args.iterations, init=args.init, method=args.method,
                       seed=args.seed, batch_size=args.batch_size, checkpoint=args.checkpoint,
                       progress=progress, metadata=meta)
    return book, info, meta


def _check_writable(flag: str, path: Path) -> None:
    """Fail now, not after training, when ``path`` is a folder or its folder takes no new file."""
    import os
    import tempfile

    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path}: is a folder, not a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
    except OSError as exc:
        problem = f"cannot write in folder {path.parent} ({exc.strerror})"
        raise PermissionError(f"{flag} {path}: {problem}") from None
    os.close(fd)
    os.unlink(probe)


def run(args) -> int:
    out = Path(args.out)
    if out.exists() and not args.force and not out.is_dir():
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")

    for flag, value in (("--size", args.size), ("--iterations", args.iterations),
                        ("--sample-per-image", args.sample_per_image), ("--max-samples", args.max_samples),
                        ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be positive, got {value}")
    if args.model is not None and args.features != "delf":
        raise UsageError("--model is only used with --features delf")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {out.parent} does not exist")
    for flag, value in (("--store", args.store), ("--images", args.images),
                        ("--descriptors", args.descriptors),
                        ("--checkpoint", Path(args.checkpoint).parent if args.checkpoint else None)):
        if value is not None and not Path(value).exists():
            raise FileNotFoundError(f"{flag} {value}: not found")
    _check_writable("--out", out)
    if args.checkpoint:
        _check_writable("--checkpoint", Path(args.checkpoint))
    # a K the sample cannot give is refused before any image is read (an empty folder too: one line)
    plan = CodebookConfig(size=args.size, sample_per_image=args.sample_per_image,
                          max_samples=args.max_samples)
    check_codebook_plan(plan, images=len(list_images(args.images)) if args.images else None,
                        option="--size", samples_option="--max-samples")
    if args.ray is not None:
        if args.method != "lloyd":
            raise UsageError(f"--ray runs --method lloyd, not {args.method!r}")

        with session(args.ray or None):  # one Ray session for the sampling and the training
            book, info, meta = _train(args, ray=True)
    else:
        book, info, meta = _train(args, ray=False)
    book.save(out)
    log.info("wrote %s (%r)", out, book)
    summary = {"out": str(out), "k": book.size, "D": book.dim, "samples": info["samples"],
               "images": meta.get("training_images"), "iterations": info["iterations"],
               "inertia": info["final_inertia"], "seconds": round(info["seconds"], 3),
               "converged": info["converged"], "resumed_from": info["resumed_from"],
               "fingerprint": book.fingerprint}
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    elif not args.quiet:
        print(f"{out}: K={book.size} D={book.dim} samples={info['samples']} iterations={info['iterations']} "
              f"inertia={info['final_inertia']:.6g} fingerprint={book.fingerprint}")
    return 0
