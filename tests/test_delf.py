"""DELF mechanics with small random-weight models: receptive fields, threshold / top-k semantics, export →
reload through from_saved_model, the TF1 hub format with the official tensor names, and the ResNet50 build."""

import numpy as np
import pytest

import tensorflow as tf  # a hard dependency: a broken install must fail, not skip
import keras  # noqa: E402

from d2r.features import PCA  # noqa: E402
from d2r.features.delf import (  # noqa: E402
    PAPER_SCALES, DELF, _ExportModule, DELFConfig, build_delf_model, multiscale_extract, receptive_boxes, receptive_field,
    receptive_field_of_stack,
)


def two_layer_backbone(seed=0, channels=16):
    """ZeroPadding(1) + 3x3/2 valid, then 3x3/2 valid: rf 7, stride 4, padding 1 (hand-computed below)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((None, None, 3))
    x = keras.layers.ZeroPadding2D(1)(inp)
    x = keras.layers.Conv2D(8, 3, strides=2, name="c1")(x)
    x = keras.layers.Conv2D(channels, 3, strides=2, name="c2")(x)
    return keras.Model(inp, x, name="tiny")


@pytest.fixture(scope="module")
def tiny_delf():
    keras.utils.set_random_seed(1)
    model = build_delf_model(two_layer_backbone(), attention_hidden=8)
    return model


@pytest.fixture
def image(rng):
    return rng.integers(0, 256, (45, 62, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ receptive fields
def test_receptive_field_hand_computed_stacks():
    # one 3x3 conv, stride 2, no padding: cell i sees pixels [2i, 2i + 2]
    assert receptive_field_of_stack([(3, 2, 0)]) == (3, 2, 0)
    # pad 1 + 3x3/2, then 3x3/2: cell j sees layer-1 cells [2j, 2j + 2] = pixels [4j - 1, 4j + 5]
    assert receptive_field_of_stack([(3, 2, 1), (3, 2, 0)]) == (7, 4, 1)
    # two stride-1 'same' 3x3 convs: rf 5, padding 2
    assert receptive_field_of_stack([(3, 1, 1), (3, 1, 1)]) == (5, 1, 2)
    boxes = receptive_boxes(2, 3, 7, 4, 1)
    np.testing.assert_array_equal(boxes[0], [-1, -1, 5, 5])
    np.testing.assert_array_equal(boxes[5], [3, 7, 9, 13])  # row 1, column 2


def test_receptive_field_of_keras_models():
    one = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(4, 3, strides=2)])
    assert receptive_field(one) == (3, 2, 0)
    assert receptive_field(two_layer_backbone()) == (7, 4, 1)
    inp = keras.Input((None, None, 3))
    a = keras.layers.Conv2D(4, 3, padding="same")(inp)
    a = keras.layers.Conv2D(4, 3, padding="same", dilation_rate=2)(a)
    b = keras.layers.Conv2D(4, 1)(inp)
    x = keras.layers.Add()([a, b])
    x = keras.layers.MaxPooling2D(2)(x)
    # 3x3 (rf 3, pad 1) -> dilated 3x3 = 5 taps (rf 7, pad 3) ; the 1x1 shortcut is smaller ; pool 2/2
    assert receptive_field(keras.Model(inp, x)) == (8, 2, 3)
    with pytest.raises(ValueError, match="Flatten"):
        receptive_field(keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten()]))


def test_receptive_field_matches_gradients():
    """Pixels with a non-zero gradient for one output cell span exactly the computed receptive box."""
    model = two_layer_backbone(seed=3)
    rf, stride, pad = receptive_field(model)
    x = tf.Variable(tf.random.normal((1, 40, 40, 3)))
    for (i, j) in [(4, 5), (2, 7)]:
        with tf.GradientTape() as tape:
            y = tf.reduce_sum(model(x)[0, i, j])
        g = np.abs(tape.gradient(y, x).numpy()[0]).sum(-1)
        rows, cols = np.nonzero(g)
        assert (rows.min(), rows.max()) == (stride * i - pad, stride * i - pad + rf - 1)
        assert (cols.min(), cols.max()) == (stride * j - pad, stride * j - pad + rf - 1)


# -------------------------------------------------------------------------------------- selection semantics
def reference_extract(model, image, scales, max_num, thres, rf, stride, pad):
    """Plain numpy selection over per-scale model outputs (model run scale by scale)."""
    img = (image.astype(np.float32) - 128.0) / 128.0
    boxes, feats, fscales, scores = [], [], [], []
    for s in scales:
        size = np.maximum(np.round(np.array(image.shape[:2], np.float32) * np.float32(s)), 1).astype(np.int32)
        resized = tf.image.resize(img[None], size, method="bilinear")
        att, fm = (t.numpy()[0] for t in model(resized, training=False))
        h, w = fm.shape[:2]
        a = att.reshape(-1)
        keep = a >= thres
        boxes.append(receptive_boxes(h, w, rf, stride, pad)[keep] / np.float32(s))
        feats.append(fm.reshape(-1, fm.shape[-1])[keep])
        fscales.append(np.full(keep.sum(), 1.0 / np.float32(s), np.float32))
        scores.append(a[keep])
    boxes, feats, fscales, scores = map(np.concatenate, (boxes, feats, fscales, scores))
    order = np.argsort(-scores, kind="stable")[:max_num]
    return boxes[order], feats[order], fscales[order], scores[order]


@pytest.mark.parametrize("max_num, quantile", [(1000, 0.6), (15, 0.0), (7, 0.9)])
def test_threshold_and_topk_semantics(tiny_delf, image, max_num, quantile):
    scales = (0.5, 0.7071, 1.0, 1.4142)
    probe = DELF.from_keras(model=tiny_delf, config=DELFConfig(scales=scales, score_threshold=-1.0,
                                                               max_features=100000))
    all_scores = probe.run_raw(image)[3]
    thres = float(np.quantile(all_scores, quantile))
    dlf = DELF.from_keras(model=tiny_delf, config=DELFConfig(scales=scales, score_threshold=thres,
                                                             max_features=max_num))
    rf = dlf.rf
    assert rf == (7.0, 4.0, 1.0)
    boxes, feats, fscales, scores = dlf.run_raw(image)
    eb, ef, es, ea = reference_extract(tiny_delf, image, scales, max_num, thres, *rf)
    assert len(scores) == len(ea) == min(max_num, int((all_scores >= thres).sum()))
    assert (scores >= thres).all() and np.all(np.diff(scores) <= 0)
    np.testing.assert_allclose(scores, ea, rtol=1e-5)
    np.testing.assert_allclose(boxes, eb, rtol=1e-6)
    np.testing.assert_allclose(feats, ef, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(fscales, es)
    f = dlf.extract(image)
    assert f.descriptors.shape == (len(ea), 16)  # no PCA: L2-normalised raw features
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-5)
    # location = box centre, (x, y), original pixels: at scale s, cell (i, j) -> ((4j + 2) / s, (4i + 2) / s)
    np.testing.assert_allclose(f.locations[:, 0], (eb[:, 1] + eb[:, 3]) / 2, rtol=1e-6)
    np.testing.assert_allclose(f.locations[:, 1], (eb[:, 0] + eb[:, 2]) / 2, rtol=1e-6)
    cell = f.locations * (1.0 / f.scales)[:, None]  # back to the scale's pixel grid
    np.testing.assert_allclose((cell - 2) / 4, np.round((cell - 2) / 4), atol=1e-3)


def test_topk_ties_keep_scale_then_cell_order(tiny_delf):
    """A flat image gives many equal attention values: ties go to the earlier scale, then the earlier cell."""
    img = np.full((40, 48, 3), 77, np.uint8)
    scales = (1.0, 0.5)
    for k in (3, 11, 40):
        dlf = DELF.from_keras(model=tiny_delf, config=DELFConfig(scales=scales, score_threshold=-1.0,
                                                                 max_features=k))
        boxes, _, fscales, scores = dlf.run_raw(img)
        eb, _, es, ea = reference_extract(tiny_delf, img, scales, k, -1.0, *dlf.rf)
        assert len(np.unique(ea)) < len(ea)  # there really are ties
        np.testing.assert_array_equal(boxes, eb)
        np.testing.assert_array_equal(fscales, es)


def test_all_cells_at_scale_one_hand_computed(tiny_delf):
    img = np.full((20, 28, 3), 90, np.uint8)
    dlf = DELF.from_keras(model=tiny_delf, config=DELFConfig(scales=(1.0,), score_threshold=-1.0))
    f = dlf.extract(img)
    # 20x28 -> pad 22x30 -> 10x14 -> 4x6 cells; centres 4k + 2
    assert len(f) == 24
    got = sorted(map(tuple, f.locations.tolist()))
    want = sorted((4.0 * j + 2, 4.0 * i + 2) for i in range(4) for j in range(6))
    assert got == want
    np.testing.assert_array_equal(f.scales, 1.0)


def test_small_and_empty_images(tiny_delf, image):
    dlf = DELF.from_keras(model=tiny_delf, config=DELFConfig(scales=(1.0,)))
    for img in (np.zeros((9, 40, 3), np.uint8), np.zeros((1, 1, 3), np.uint8)):
        f = dlf.extract(img)
        assert len(f) == 0 and f.descriptors.shape == (0, 16)
    high = DELF.from_keras(model=tiny_delf, config=DELFConfig(scales=(1.0,), score_threshold=1e9))
    assert len(high.extract(image)) == 0


def test_config_defaults_are_the_paper():
    c = DELFConfig()
    assert c.scales == PAPER_SCALES == (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
    assert (c.score_threshold, c.max_features, c.use_pca, c.pca_dim) == (100.0, 1000, True, 128)
    with pytest.raises(ValueError):
        DELFConfig(scales=(0.5, -1.0))


# ------------------------------------------------------------------------------------------ export / reload
def test_export_reload_same_features(tiny_delf, tmp_path, rng):
    cfg = DELFConfig(scales=(0.5, 1.0, 1.4142), score_threshold=0.0, max_features=60)
    dlf = DELF.from_keras(model=tiny_delf, config=cfg)
    train = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8) for _ in range(3)]
    pca = dlf.fit_pca(train, dim=8)
    assert dlf.config.use_pca and dlf.dim == 8
    img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    ours = dlf.extract(img)
    assert ours.descriptors.shape == (60, 8)
    dlf.export(tmp_path / "m")
    assert (tmp_path / "m" / "pca" / "mean.datum").exists()
    back = DELF.from_saved_model(tmp_path / "m", config=dlf.config)  # PCA found in m/pca
    assert back.pca.fingerprint() == pca.fingerprint() and back.dim == 8
    theirs = back.extract(img)
    np.testing.assert_allclose(theirs.descriptors, ours.descriptors, atol=1e-5)
    np.testing.assert_allclose(theirs.locations, ours.locations, atol=1e-5)
    np.testing.assert_allclose(theirs.scores, ours.scores, rtol=1e-5)
    np.testing.assert_array_equal(theirs.scales, ours.scales)
    # the serving signature itself, called the official way
    loaded = tf.saved_model.load(str(tmp_path / "m"))
    out = loaded.signatures["serving_default"](
        input_image=tf.constant(img), input_scales=tf.constant([1.0]),
        input_max_feature_num=tf.constant(5), input_abs_thres=tf.constant(0.0))
    assert sorted(out) == ["boxes", "features", "scales", "scores"]
    assert out["features"].shape == (5, 16) and out["scores"].shape == (5, 1)
    with pytest.raises(FileExistsError):
        dlf.export(tmp_path / "m")
    # an official-style TF2 export: the module saved without explicit signatures (export_local_model.py)
    module = _ExportModule.make(tiny_delf, dlf.rf, dlf.raw_dim)
    tf.saved_model.save(module, str(tmp_path / "tf2" / "model"))
    pca.save(tmp_path / "tf2" / "pca")
    plain = DELF.from_saved_model(tmp_path / "tf2" / "model", config=dlf.config)
    np.testing.assert_allclose(plain.extract(img).descriptors, ours.descriptors, atol=1e-5)
    assert back.fingerprint() == DELF.from_saved_model(tmp_path / "m", config=dlf.config).fingerprint()


def test_from_saved_model_errors(tmp_path, tiny_delf):
    with pytest.raises(FileNotFoundError):
        DELF.from_saved_model(tmp_path / "none")
    dlf = DELF.from_keras(model=tiny_delf, config=DELFConfig(scales=(1.0,)))
    dlf.export(tmp_path / "m")
    with pytest.raises(ValueError, match="PCA"):
        DELF.from_saved_model(tmp_path / "m", DELFConfig())  # paper config wants a PCA; none shipped
    back = DELF.from_saved_model(tmp_path / "m")  # default: the config saved with the export
    assert back.config == dlf.config and back.dim == 16
    assert DELF.from_saved_model(tmp_path / "m", max_features=7).config.max_features == 7

    class Other(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def __call__(self, x):
            return {"y": x * 2}

    tf.saved_model.save(Other(), str(tmp_path / "other"), signatures=None)
    with pytest.raises(ValueError, match="DELF"):
        DELF.from_saved_model(tmp_path / "other", DELFConfig(use_pca=False))


def test_tf1_hub_format_with_official_tensor_names(tmp_path, rng):
    """A TF1 SavedModel (graph + SavedModelBuilder) exposing the official D2R tensors, with real TF ops."""
    path = tmp_path / "delf_tf1" / "model"
    depth = 12
    with tf.Graph().as_default() as g, tf.compat.v1.Session(graph=g) as sess:
        image = tf.compat.v1.placeholder(tf.uint8, [None, None, 3], name="input_image")
        scales = tf.compat.v1.placeholder(tf.float32, [None], name="input_scales")
        max_num = tf.compat.v1.placeholder(tf.int32, [], name="input_max_feature_num")
        thres = tf.compat.v1.placeholder(tf.float32, [], name="input_abs_thres")
        init = tf.compat.v1.random_normal_initializer(seed=5)
        w1 = tf.compat.v1.get_variable("w1", [3, 3, 3, depth], initializer=init)
        w2 = tf.compat.v1.get_variable("w2", [1, 1, depth, 1], initializer=init)

        def model_fn(x):
            fm = tf.nn.conv2d(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), w1, strides=2, padding="VALID")
            att = tf.nn.softplus(tf.nn.conv2d(tf.nn.relu(fm), w2, strides=1, padding="VALID"))
            return att, fm

        b, f, s, a = multiscale_extract(model_fn, image, scales, max_num, thres, 3.0, 2.0, 1.0, depth)
        outs = [tf.identity(b, name="boxes"), tf.identity(f, name="features"), tf.identity(s, name="scales"),
                tf.identity(a, name="scores")]
        sess.run(tf.compat.v1.global_variables_initializer())
        img = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
        feed = {image: img, scales: [0.5, 1.0], max_num: 25, thres: 0.1}
        eb, ef, es, ea = sess.run(outs, feed_dict=feed)
        builder = tf.compat.v1.saved_model.Builder(str(path))
        builder.add_meta_graph_and_variables(sess, [tf.compat.v1.saved_model.tag_constants.SERVING])
        builder.save()
    assert len(ea) == 25
    # the official PCA folder sits beside model/ (delf_gld_20190411/{model,pca}) in the official .datum format
    pca = PCA(dim=6).fit(rng.standard_normal((100, depth)).astype(np.float32))
    pca.save(tmp_path / "delf_tf1" / "pca")
    (tmp_path / "delf_tf1" / "pca" / "pca.json").unlink()  # official folders have only the .datum files
    dlf = DELF.from_saved_model(path, DELFConfig(scales=(0.5, 1.0), max_features=25, score_threshold=0.1,
                                                 pca_dim=6))
    feats = dlf.extract(img)
    assert feats.descriptors.shape == (25, 6) and dlf.raw_dim == depth
    np.testing.assert_allclose(feats.scores, ea[:, 0], rtol=1e-6)
    # x from xmin / xmax, y from ymin / ymax
    np.testing.assert_allclose(feats.locations[:, 0], (eb[:, 1] + eb[:, 3]) / 2, atol=1e-5)
    np.testing.assert_allclose(feats.locations[:, 1], (eb[:, 0] + eb[:, 2]) / 2, atol=1e-5)
    np.testing.assert_allclose(feats.descriptors, pca.transform(ef), atol=1e-5)
    np.testing.assert_array_equal(feats.scales, es)


# ------------------------------------------------------------------------------------------ ResNet50
def test_resnet50_delf_construction(rng):
    model = build_delf_model("resnet50", weights=None)
    assert receptive_field(model) == (291.0, 16.0, 145.0)
    assert model.outputs[1].shape[-1] == 1024
    dlf = DELF.from_keras(model=model, config=DELFConfig(scales=(0.5, 1.0), score_threshold=0.0,
                                                         max_features=20))
    f = dlf.extract(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    assert f.descriptors.shape == (20, 1024) and dlf.dim == 1024
    with pytest.raises(FileNotFoundError):
        build_delf_model("resnet50", weights="/no/such/weights.h5")


def test_cli_extract_with_exported_delf(tiny_delf, tmp_path, rng, capsys):
    import json

    from PIL import Image

    from d2r.cli import main
    from d2r.features import FeatureStore, get_extractor

    dlf = DELF.from_keras(model=tiny_delf, config=DELFConfig(scales=(0.5, 1.0), score_threshold=0.0))
    dlf.fit_pca([rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)], dim=4)
    dlf.export(tmp_path / "m")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    (imgs / "bad.jpg").write_bytes(b"junk")
    argv = ["extract", "--images", str(imgs), "--features", "delf", "--model", str(tmp_path / "m"),
            "--out", str(tmp_path / "s"), "--max-features", "30", "--quiet", "--json"]
    assert main(argv) == 3  # a partial failure: bad.jpg
    s = json.loads(capsys.readouterr().out)
    assert (s["extracted"], s["failed"]) == (3, 1)
    store = FeatureStore.open(tmp_path / "s")
    assert store.dim == 4 and store.extractor["name"] == "delf"
    ref = get_extractor("delf", model=tmp_path / "m", scales=(0.5, 1.0), score_threshold=0.0, max_features=30)
    f = ref.extract(imgs / "1.png")
    np.testing.assert_allclose(store.get("1").descriptors, f.descriptors, atol=1e-6)
