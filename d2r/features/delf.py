"""DELF local features: official SavedModels run by path, and our Keras DELF that exports the same signature.

Both run the same extraction contract (the official serving signature)::
    (input_image uint8 (H, W, 3), input_scales float32 (S,), input_max_feature_num int32,
     input_abs_thres float32)
        -> boxes (N, 4) [ymin, xmin, ymax, xmax] receptive boxes in ORIGINAL pixels,
           features (N, C) raw descriptors, scales (N,) = 1 / image scale, scores (N, 1) attention

with the paper semantics: pixels (x − 128) / 128; for each scale the image is resized (bilinear) to
round(size × scale); cells with attention >= threshold are kept per scale; the top ``max_feature_num`` by
attention over all scales are returned, strongest first. :class:`DELF` then takes the box centre as the
keypoint, converts the official (y, x) to our (x, y), and post-processes descriptors L2 → PCA (mean,
projection, 128-D, no whitening) → L2.

TensorFlow is imported only inside this module's functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2r.config import Config
from d2r.features.base import LocalFeatures
from d2r.features.image import load_image, resize_max_side
from d2r.features.pca import PCA, l2_normalize, load_pca
from d2r._io import write_json

log = logging.getLogger(__name__)

MIN_SIDE = 10
PAPER_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
TF1_FEEDS = ("input_image:0", "input_scales:0", "input_max_feature_num:0", "input_abs_thres:0")
TF1_FETCHES = ("boxes:0", "features:0", "scales:0", "scores:0")
OUTPUT_KEYS = ("boxes", "features", "scales", "scores")
META_FILE = "d2r_delf.json"


@dataclass
class DELFConfig(Config):
    """Extraction options; defaults are the D2R paper config (``delf_gld_config.pbtxt``).

    ``max_side``: downscale the image first so its longer side is at most this; locations are mapped back to
    original pixels either way. Default 1024 (revisitop and GLDv2 photos are at most that, so nothing changes
    there), because the 2.0 scale of a 12-megapixel phone photo does not fit in memory; None never downscales,
    as the paper (the shipped paper configs set it)."""
    scales: tuple = PAPER_SCALES
    score_threshold: float = 100.0
    max_features: int = 1000
    use_pca: bool = True
    pca_dim: int = 128
    max_side: int | None = 1024

    def __post_init__(self):
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive, got {self.scales}")
        if self.max_features <= 0:
            raise ValueError(f"max_features must be positive, got {self.max_features}")


# =========================================================================================== receptive fields
def receptive_field_of_stack(layers) -> tuple[float, float, float]:
    """(rf, stride, padding) of a chain of layers given as ``(kernel, stride, left_padding)`` triples.

    Output cell i of the chain sees input pixels [stride·i − padding, stride·i − padding + rf − 1] (the
    official ``CalculateReceptiveBoxes`` convention). Composition of (R, S, P) with a layer (k, s, p):
    R' = R + (k − 1)·S, S' = S·s, P' = P + p·S, starting from (1, 1, 0).
    """
    r, s, p = 1.0, 1.0, 0.0
    for k, st, pad in layers:
        r, s, p = r + (k - 1) * s, s * st, p + pad * s
    return r, s, p


def _same_pad(k_eff: int, s: int) -> int:
    # TF 'same' padding puts floor(total / 2) on the top/left; total = max(k - s, 0) when the input size is a
    # multiple of the stride (the assumption made here: for stride-1 layers it is exact for every size).
    return max(k_eff - s, 0) // 2


def _layer_rf(layer) -> tuple[int, int, int] | None:
    """(k, s, p) of one Keras layer along one axis; None for layers that keep the pixel grid."""
    cls = type(layer).__name__
    cfg = layer.get_config()

    def pair(v):
        v = tuple(v) if isinstance(v, (list, tuple)) else (v, v)
        if v[0] != v[1]:
            raise ValueError(f"layer {layer.name}: non-square {cls} {v} is not supported "
                             "for receptive fields")
        return int(v[0])

    if cls in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D"):
        k, s = pair(cfg["kernel_size"]), pair(cfg["strides"])
        d = pair(cfg.get("dilation_rate", 1))
        k_eff = d * (k - 1) + 1
        pad = 0 if cfg["padding"] == "valid" else _same_pad(k_eff, s)
        return k_eff, s, pad
    if cls in ("MaxPooling2D", "AveragePooling2D"):
        k = pair(cfg["pool_size"])
        s = pair(cfg["strides"] if cfg.get("strides") is not None else cfg["pool_size"])
        pad = 0 if cfg["padding"] == "valid" else _same_pad(k, s)
        return k, s, pad
    if cls == "ZeroPadding2D":
        (top, _), (left, _) = cfg["padding"]
        if top != left:
            raise ValueError(f"layer {layer.name}: asymmetric ZeroPadding2D {cfg['padding']} "
                             "is not supported")
        return 1, 1, int(top)
    if cls in _GRID_PRESERVING:
        return None
    raise ValueError(f"layer {layer.name}: cannot compute the receptive field through a {cls} layer")


_GRID_PRESERVING = {
    "InputLayer", "BatchNormalization", "Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "Softmax", "Add",
    "Multiply", "Subtract", "Average", "Maximum", "Minimum", "Concatenate", "Dropout", "SpatialDropout2D",
    "Rescaling", "Normalization", "LayerNormalization", "GroupNormalization", "Identity", "UnitNormalization",
}


def receptive_field(model) -> tuple[float, float, float]:
    """(rf, stride, padding) of the output of a Keras conv model (Sequential or Functional, nested models).

    Where branches merge (ResNet additions) the branch with the largest receptive field wins; all branches
    must share the stride. Keras ResNet50 up to ``conv4_block6_out`` gives (291, 16, 145).
    """
    import keras

    if isinstance(model, keras.Sequential):
        state = (1.0, 1.0, 0.0)
        for layer in model.layers:
            state = _compose(state, layer)
        return state
    rf: dict[int, tuple[float, float, float]] = {}
    for inp in _as_list(model.inputs):
        rf[id(inp)] = (1.0, 1.0, 0.0)
    for layer in model.layers:
        if type(layer).__name__ == "InputLayer":
            for t in _as_list(layer.output):
                rf.setdefault(id(t), (1.0, 1.0, 0.0))
            continue
        # The call of this layer inside ``model``: the inbound node whose inputs were all reached already.
        for node in getattr(layer, "_inbound_nodes", []):
            ins = [rf.get(id(t)) for t in _as_list(node.input_tensors)]
            if ins and all(v is not None for v in ins):
                break
        else:
            raise ValueError(f"layer {layer.name}: input not reached while computing the receptive field")
        strides = {v[1] for v in ins}
        if len(strides) != 1:
            raise ValueError(f"layer {layer.name}: merges branches with different strides {sorted(strides)}")
        state = max(ins, key=lambda v: v[0])
        out = _compose(state, layer)
        for t in _as_list(node.output_tensors):
            rf[id(t)] = out
    outs = _as_list(model.outputs)
    return rf[id(outs[0])]


def _compose(state, layer):
    import keras

    if isinstance(layer, keras.Model):
        r2, s2, p2 = receptive_field(layer)
        r, s, p = state
        return r + (r2 - 1) * s, s * s2, p + p2 * s
    krn = _layer_rf(layer)
    if krn is None:
        return state
    r, s, p = state
    k, st, pad = krn
    return r + (k - 1) * s, s * st, p + pad * s


def _as_list(x):
    if isinstance(x, (list, tuple)):
        return list(x)
    if isinstance(x, dict):
        return list(x.values())
    return [x]


def receptive_boxes(height: int, width: int, rf: float, stride: float, padding: float) -> np.ndarray:
    """(h·w, 4) float32 [ymin, xmin, ymax, xmax] receptive boxes of a feature grid, row-major
    (the official layout)."""
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    c = np.stack([y.ravel(), x.ravel()], axis=1).astype(np.float64)
    return np.concatenate([c * stride - padding, c * stride - padding + rf - 1], axis=1).astype(np.float32)


# ===================================================================================== TF extraction graph
def multiscale_extract(model_fn, image, scales, max_feature_num, abs_thres, rf, stride, padding, depth):
    """The extraction contract in TF ops (works in a tf.function and in a TF1 graph).

    ``model_fn(images float32 (1, h, w, 3)) -> (attention (1, h', w', 1), features (1, h', w', depth))``.
    Returns boxes (N, 4), features (N, depth), scales (N,), scores (N, 1), strongest first.
    """
    import tensorflow as tf

    image_f = (tf.cast(image, tf.float32) - 128.0) / 128.0
    image_f = tf.expand_dims(image_f, 0)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    scales = tf.cast(scales, tf.float32)
    n = tf.shape(scales)[0]
    rf, stride, padding = float(rf), float(stride), float(padding)

    def body(i, b_ta, f_ta, s_ta, a_ta):
        scale = scales[i]
        size = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)
        resized = tf.image.resize(image_f, size, method="bilinear")
        att, feat = model_fn(resized)
        att = tf.reshape(att[0], [-1])
        h, w = tf.shape(feat)[1], tf.shape(feat)[2]
        feat = tf.reshape(feat[0], [-1, depth])
        yy, xx = tf.meshgrid(tf.range(h), tf.range(w), indexing="ij")
        cells = tf.cast(tf.reshape(tf.stack([yy, xx], axis=-1), [-1, 2]), tf.float32)
        start = cells * stride - padding
        boxes = tf.concat([start, start + (rf - 1.0)], axis=1) / scale
        keep = tf.reshape(tf.where(att >= abs_thres), [-1])
        # Per-scale top-k first (same final result, ties included: top_k keeps the lower index first), so
        # at most max_feature_num feature rows per scale are copied.
        k_s = tf.minimum(tf.cast(max_feature_num, tf.int32), tf.size(keep))
        keep = tf.gather(keep, tf.math.top_k(tf.gather(att, keep), k=k_s, sorted=True).indices)
        sel_att = tf.gather(att, keep)
        return (i + 1, b_ta.write(i, tf.gather(boxes, keep)), f_ta.write(i, tf.gather(feat, keep)),
                s_ta.write(i, tf.ones_like(sel_att) / scale), a_ta.write(i, sel_att))

    def ta(shape):
        return tf.TensorArray(tf.float32, size=n, infer_shape=False, element_shape=tf.TensorShape(shape))

    _, b_ta, f_ta, s_ta, a_ta = tf.while_loop(
        lambda i, *_: i < n, body, [tf.constant(0), ta([None, 4]), ta([None, depth]), ta([None]), ta([None])],
        parallel_iterations=1)
    boxes, feats, fscales, scores = b_ta.concat(), f_ta.concat(), s_ta.concat(), a_ta.concat()
    k = tf.minimum(tf.cast(max_feature_num, tf.int32), tf.shape(scores)[0])
    top = tf.math.top_k(scores, k=k, sorted=True)  # ties: lower index (earlier scale) first
    idx = top.indices
    return (tf.gather(boxes, idx), tf.gather(feats, idx), tf.gather(fscales, idx),
            tf.expand_dims(tf.gather(scores, idx), 1))


def _signature_specs():
    import tensorflow as tf

    return [
        tf.TensorSpec(shape=[None, None, 3], dtype=tf.uint8, name="input_image"),
        tf.TensorSpec(shape=[None], dtype=tf.float32, name="input_scales"),
        tf.TensorSpec(shape=(), dtype=tf.int32, name="input_max_feature_num"),
        tf.TensorSpec(shape=(), dtype=tf.float32, name="input_abs_thres"),
    ]


# =========================================================================================== Keras model
def build_delf_model(backbone="resnet50", weights=None, attention_hidden: int = 512):
    """Keras DELF: backbone feature map + attention head (1×1 conv → ReLU → 1×1 conv → softplus).

    Args:
        backbone: ``"resnet50"`` (Keras ResNet50 v1 up to ``conv4_block6_out``: 1024-D, stride 16) or a Keras
            model mapping (1, H, W, 3) normalised images to a (1, h, w, C) feature map.
        weights: for ResNet50: None (random), ``"imagenet"`` (Keras download, needs network) or a local
            weights file of ResNet50 without top.
    Returns a Keras model: images (1, H, W, 3) float32 → [attention (1, h, w, 1), features (1, h, w, C)].
    """
    import keras

    if isinstance(backbone, str):
        if backbone.lower() != "resnet50":
            raise ValueError(f"unknown backbone {backbone!r}; use 'resnet50' or pass a Keras model")
        if weights is not None and weights != "imagenet" and not Path(weights).exists():
            raise FileNotFoundError(f"{weights}: ResNet50 weights file not found")
        full = keras.applications.ResNet50(include_top=False, weights=weights, input_shape=(None, None, 3))
        backbone = keras.Model(full.input, full.get_layer("conv4_block6_out").output, name="resnet50_conv4")
    elif weights is not None:
        backbone.load_weights(weights)
    inp = keras.Input(shape=(None, None, 3), name="image")
    feat = backbone(inp)
    x = keras.layers.Conv2D(attention_hidden, 1, name="attn_conv1")(feat)
    x = keras.layers.ReLU(name="attn_relu")(x)
    x = keras.layers.Conv2D(1, 1, name="attn_conv2")(x)
    att = keras.layers.Activation("softplus", name="attn_softplus")(x)
    return keras.Model(inp, [att, feat], name="delf")


class _ExportModule:
    """Built lazily (tf.Module subclass created on first use so TF stays unimported at module load)."""
    cls = None

    @classmethod
    def make(cls, keras_model, rf, depth):
        import tensorflow as tf

        if cls.cls is None:
            class DelfExport(tf.Module):
                def __init__(self, model, rf, depth):
                    super().__init__(name="d2r_delf")
                    self.model = model
                    self._rf = tuple(float(v) for v in rf)
                    self._depth = int(depth)
                    self.ExtractFeatures = tf.function(self._extract, input_signature=_signature_specs())

                def _extract(self, input_image, input_scales, input_max_feature_num, input_abs_thres):
                    b, f, s, a = multiscale_extract(
                        lambda x: self.model(x, training=False), input_image, input_scales,
                        input_max_feature_num, input_abs_thres, *self._rf, self._depth)
                    return {"boxes": tf.identity(b, name="boxes"),
                            "features": tf.identity(f, name="features"),
                            "scales": tf.identity(s, name="scales"),
                            "scores": tf.identity(a, name="scores")}

            cls.cls = DelfExport
        return cls.cls(keras_model, rf, depth)


# =========================================================================================== the extractor
class DELF:
    """DELF extractor. Build with :meth:`from_saved_model` (official TF1 hub export, official TF2 export, or a
    d2r export) or :meth:`from_keras` (our model). ``extract(image) -> LocalFeatures``:
    locations (N, 2) float32 (x, y) receptive-box centres in ORIGINAL pixels; scales (N,) = 1 / image scale
    (official convention: larger = coarser); scores (N,) attention; descriptors (N, pca_dim) float32 unit rows
    (or (N, C) L2-normalised raw features when ``use_pca`` is False). Strongest first; N <= max_features.
    Images smaller than 10×10 give N = 0.
    """
    name = "delf"
    default_workers = 1  # TensorFlow already uses every core

    def __init__(self, runner, raw_dim: int, config: DELFConfig | None = None, pca=None, source: str = "",
                 model_hash: str = "", keras_model=None, rf=None):
        config = config or DELFConfig()
        self._runner = runner
        self.raw_dim = int(raw_dim)
        self.pca = load_pca(pca, dim=config.pca_dim) if pca is not None else None
        if self.pca is not None and self.pca.dim != config.pca_dim:
            config = config.replace(pca_dim=self.pca.dim)  # a PCA object carries its own dimension
        self.config = config
        if self.config.use_pca and self.pca is None:
            raise ValueError("DELF: use_pca is on but no PCA was given (pass pca=FOLDER or use_pca=False)")
        if self.pca is not None and self.pca.input_dim != self.raw_dim:
            raise ValueError(f"DELF: PCA expects D={self.pca.input_dim}, the model gives D={self.raw_dim}")
        self.source = source
        self._model_hash = model_hash
        self.keras_model = keras_model
        self.rf = rf

    # ------------------------------------------------------------------------------------ constructors
    @classmethod
    def from_saved_model(cls, path, config: DELFConfig | None = None, pca="auto", **overrides) -> "DELF":
        """Load a DELF SavedModel by path and run it by its serving signature.

        Supported: TF1 hub-format exports (the D2R ``delf_gld_20190411`` model: tensors ``input_image:0``,
        ``input_scales:0``, ``input_max_feature_num:0``, ``input_abs_thres:0`` → ``boxes:0``, ``features:0``,
        ``scales:0``, ``scores:0``), TF2 exports with a ``serving_default`` signature or an
        ``ExtractFeatures`` function, and :meth:`export` output. ``pca``: a PCA, a folder with
        ``mean.datum`` / ``pca_proj_mat.datum``, None, or ``"auto"`` (``PATH/pca`` or ``PATH/../pca``).
        ``config`` defaults to the config saved by :meth:`export` (else the paper's); ``overrides`` replace
        single fields of it (``max_features=500``).
        """
        import tensorflow as tf

        path = Path(path)
        if not (path / "saved_model.pb").exists() and not (path / "saved_model.pbtxt").exists():
            raise FileNotFoundError(f"{path}: not a SavedModel folder (no saved_model.pb)")
        meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).exists() else {}
        if config is None:
            config = DELFConfig.from_dict(meta["config"]) if "config" in meta else DELFConfig()
        if overrides:
            config = config.replace(**overrides)
        if isinstance(pca, str) and pca == "auto":
            pca = None
            for cand in (path / "pca", path.parent / "pca"):
                if (cand / "mean.datum").exists() or (cand / "mean.npy").exists():
                    pca = cand
                    break
            if pca is None and config.use_pca:
                raise ValueError(f"{path}: no PCA folder found beside the model; "
                                 "pass pca=FOLDER or use_pca=False")
        loaded = tf.saved_model.load(str(path))
        runner, raw_dim = _make_runner(loaded, path)
        if raw_dim is None:
            raw_dim = int(meta.get("depth", 1024))
        h = hashlib.sha1()
        for name in ("saved_model.pb", "variables/variables.index"):
            if (path / name).exists():
                h.update((path / name).read_bytes())
        dlf = cls(runner, raw_dim, config, pca, source=str(path), model_hash=h.hexdigest()[:16])
        dlf._loaded = loaded  # keep the graph alive
        return dlf

    @classmethod
    def from_keras(cls, backbone="resnet50", weights=None, config: DELFConfig | None = None, pca=None,
                   model=None) -> "DELF":
        """Our Keras DELF (see :func:`build_delf_model`); ``model``: an already built DELF model instead.
        Without a PCA the config's ``use_pca`` is turned off (fit one with :meth:`fit_pca`)."""
        import tensorflow as tf

        keras_model = model if model is not None else build_delf_model(backbone, weights)
        rf = receptive_field(keras_model)
        depth = int(keras_model.outputs[1].shape[-1])
        config = config or DELFConfig()
        if pca is None and config.use_pca:
            config = config.replace(use_pca=False)
        fn = tf.function(
            lambda img, sc, mx, th: multiscale_extract(
                lambda x: keras_model(x, training=False), img, sc, mx, th, *rf, depth),
            input_signature=_signature_specs())

        def runner(image, scales, max_num, thres):
            out = fn(tf.constant(image), tf.constant(np.asarray(scales, np.float32)),
                     tf.constant(int(max_num), tf.int32), tf.constant(float(thres), tf.float32))
            return tuple(np.asarray(o) for o in out)

        return cls(runner, depth, config, pca, source=f"keras:{keras_model.name}", keras_model=keras_model,
                   rf=rf)

    # ------------------------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return self.pca.dim if (self.config.use_pca and self.pca is not None) else self.raw_dim

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        h.update(json.dumps({"name": self.name, "config": self.config.to_dict()}, sort_keys=True).encode())
        if self.keras_model is not None:
            for w in self.keras_model.weights:
                h.update(np.ascontiguousarray(np.asarray(w), dtype="<f4").tobytes())
        else:
            h.update(self._model_hash.encode())
        if self.config.use_pca and self.pca is not None:
            h.update(self.pca.fingerprint().encode())
        return h.hexdigest()[:16]

    def info(self) -> dict:
        return {"name": self.name, "config": dict(self.config.to_dict(), model=self.source),
                "fingerprint": self.fingerprint(), "dim": self.dim}

    # ------------------------------------------------------------------------------------ extraction
    def run_raw(self, image) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The model's raw outputs for an (H, W, 3) uint8 image: boxes (N, 4) (y, x), features (N, C),
        scales (N,), scores (N,) — no PCA, no size checks."""
        c = self.config
        boxes, feats, scales, scores = self._runner(image, c.scales, c.max_features, c.score_threshold)
        return (np.asarray(boxes, np.float32).reshape(-1, 4),
                np.asarray(feats, np.float32).reshape(-1, self.raw_dim),
                np.asarray(scales, np.float32).reshape(-1),
                np.asarray(scores, np.float32).reshape(-1))

    def extract(self, image) -> LocalFeatures:
        rgb = load_image(image)
        h, w = rgb.shape[:2]
        if h < MIN_SIDE or w < MIN_SIDE:
            return LocalFeatures.empty(self.dim)
        small = rgb if self.config.max_side is None else resize_max_side(rgb, self.config.max_side)
        boxes, feats, scales, scores = self.run_raw(small)
        if feats.shape[0] == 0:
            return LocalFeatures.empty(self.dim)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0  # (y, x)
        loc = np.stack([centres[:, 1], centres[:, 0]], axis=1).astype(np.float64)
        if small is not rgb:
            loc[:, 0] *= w / small.shape[1]
            loc[:, 1] *= h / small.shape[0]
        if self.config.use_pca and self.pca is not None:
            desc = self.pca.transform(feats)
        else:
            desc = l2_normalize(feats)
        return LocalFeatures(loc.astype(np.float32), scales, scores, np.ascontiguousarray(desc, np.float32))

    __call__ = extract

    # ------------------------------------------------------------------------------------ our model only
    def _need_keras(self, what):
        if self.keras_model is None:
            raise ValueError(f"DELF.{what} needs a Keras DELF (DELF.from_keras); this one runs {self.source}")

    def fit_pca(self, images_or_descriptors, dim: int = 128, whiten: bool = False) -> PCA:
        """Learn the descriptor PCA from raw features of ``images`` (paths/arrays) or an (N, C) array,
        attach it and turn ``use_pca`` on. Returns the PCA."""
        if isinstance(images_or_descriptors, np.ndarray) and images_or_descriptors.ndim == 2 \
                and images_or_descriptors.dtype != np.uint8:
            raw = images_or_descriptors
        else:
            parts = []
            for img in images_or_descriptors:
                rgb = load_image(img)
                if min(rgb.shape[:2]) >= MIN_SIDE:
                    parts.append(self.run_raw(rgb)[1])
            raw = np.concatenate(parts) if parts else np.zeros((0, self.raw_dim), np.float32)
        self.pca = PCA(dim=dim, whiten=whiten).fit(raw)
        self.config = self.config.replace(use_pca=True, pca_dim=dim)
        return self.pca

    def export(self, path) -> Path:
        """Write a SavedModel with the official serving signature (``serving_default`` and
        ``ExtractFeatures``) plus ``pca/`` (official .datum files, when a PCA is set) and ``d2r_delf.json``;
        refuses an existing non-empty folder."""
        import tensorflow as tf

        self._need_keras("export")
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"{path}: export folder exists and is not empty")
        module = _ExportModule.make(self.keras_model, self.rf, self.raw_dim)
        tf.saved_model.save(module, str(path), signatures={"serving_default": module.ExtractFeatures})
        if self.pca is not None:
            self.pca.save(path / "pca")

        write_json(path / META_FILE, {"format": "d2r-delf", "version": 1, "depth": self.raw_dim,
                                      "receptive_field": list(self.rf), "config": self.config.to_dict()})
        return path

    def __repr__(self) -> str:
        return f"DELF({self.source!r}, dim={self.dim}, {self.config!r})"


def _make_runner(loaded, path: Path):
    """A function (image, scales, max_num, thres) -> (boxes, features, scales, scores) numpy, and the raw
    feature depth (None when the model does not declare it)."""
    import tensorflow as tf

    def feed(image, scales, max_num, thres):
        return (tf.constant(image, tf.uint8), tf.constant(np.asarray(scales, np.float32)),
                tf.constant(int(max_num), tf.int32), tf.constant(float(thres), tf.float32))

    sigs = getattr(loaded, "signatures", {}) or {}
    if "serving_default" in sigs:
        fn = sigs["serving_default"]
        names = set(fn.structured_input_signature[1].keys())
        expected = {"input_image", "input_scales", "input_max_feature_num", "input_abs_thres"}
        if names == expected:
            outs = fn.structured_outputs
            missing = [k for k in OUTPUT_KEYS if k not in outs]
            if missing:
                raise ValueError(f"{path}: serving_default lacks outputs {missing} (has {sorted(outs)})")

            def run_sig(image, scales, max_num, thres):
                img, sc, mx, th = feed(image, scales, max_num, thres)
                out = fn(input_image=img, input_scales=sc, input_max_feature_num=mx, input_abs_thres=th)
                return tuple(out[k].numpy() for k in OUTPUT_KEYS)

            return run_sig, _depth(outs["features"])
    if hasattr(loaded, "ExtractFeatures"):
        fn = loaded.ExtractFeatures

        def run_fn(image, scales, max_num, thres):
            out = fn(*feed(image, scales, max_num, thres))
            return tuple(np.asarray(out[k]) for k in OUTPUT_KEYS)

        return run_fn, None
    if hasattr(loaded, "prune"):  # TF1 SavedModel: run by tensor names like the official extractor
        try:
            fn = loaded.prune(feeds=list(TF1_FEEDS), fetches=list(TF1_FETCHES))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: TF1 SavedModel without the DELF tensors {TF1_FEEDS} -> {TF1_FETCHES} "
                             f"({exc})") from exc

        def run_tf1(image, scales, max_num, thres):
            out = fn(*feed(image, scales, max_num, thres))
            return tuple(o.numpy() for o in out)

        depth = None
        try:
            depth = _depth(fn.structured_outputs[1])
        except Exception:
            pass
        return run_tf1, depth
    raise ValueError(f"{path}: no DELF serving signature (serving_default with input_image, input_scales, "
                     "input_max_feature_num, input_abs_thres), ExtractFeatures function or TF1 DELF tensors")


def _depth(spec):
    try:
        d = spec.shape[-1]
        return int(d) if d is not None else None
    except (TypeError, IndexError, AttributeError):
        return None
