"""SavedModelDetector on real TensorFlow SavedModels built here: a TF1 graph with the official D2R tensor
names and a TF2 Object Detection API style ``serving_default`` export, both scoring from the input image."""

import math

import numpy as np
import pytest

from d2r.detect import Detections, SavedModelDetector, get_proposer, normalized_to_pixels

import tensorflow as tf  # a hard dependency: a broken install must fail, not skip

# Normalised [ymin, xmin, ymax, xmax] boxes the test models output (fixed), for an H=50, W=64 image.
BOXES = np.array(
    [
        [0.10, 0.20, 0.55, 0.61],  # -> [12, 5, 40, 28]
        [0.00, 0.00, 1.00, 1.00],  # -> [0, 0, 64, 50]
        [0.30, 0.25, 0.10, 0.75],  # ymax*H = float32(0.1)*50 == 5.0 exactly in float32 -> y2 = 5 (not 6)
        [0.50, 0.50, 0.90, 0.90],  # low score, dropped
        [0.20, 0.20, 0.40, 0.40],  # padding beyond num_detections (score 0.99, must be ignored)
    ],
    np.float32,
)
H, W = 50, 64


def expected_pixels(box):
    ymin, xmin, ymax, xmax = (np.float32(v) for v in box)
    # the official code: math.floor(np.float32 * int) -> products rounded to float32
    return [math.floor(xmin * W), math.floor(ymin * H), math.ceil(xmax * W), math.ceil(ymax * H)]


def _outputs(images):
    """Real TF ops: scores depend on the mean pixel value m in [0, 1] of the input."""
    m = tf.reduce_mean(tf.cast(images, tf.float32)) / 255.0
    scores = tf.stack([m, 1.0 - m, tf.constant(0.1), m * 0.1, tf.constant(0.99)])[None]
    boxes = tf.constant(BOXES)[None]
    classes = tf.constant([[1.0, 2.0, 1.0, 1.0, 1.0]])
    num = tf.constant([4.0])
    return boxes, scores, classes, num


@pytest.fixture(scope="module")
def tf1_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tf1") / "d2r_detector"
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        images = v1.placeholder(tf.uint8, [1, None, None, 3], name="input_images")
        boxes, scores, classes, num = _outputs(images)
        tf.identity(boxes, name="detection_boxes")
        tf.identity(scores, name="detection_scores")
        tf.identity(classes, name="detection_classes")
        tf.identity(num, name="num_detections")
        with v1.Session(graph=graph) as sess:
            builder = v1.saved_model.Builder(str(path))
            builder.add_meta_graph_and_variables(sess, [v1.saved_model.tag_constants.SERVING])
            builder.save()
    return path


@pytest.fixture(scope="module")
def tf2_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tf2") / "od_api_export"

    class Exported(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8, name="input_tensor")])
        def serve(self, input_tensor):
            boxes, scores, classes, num = _outputs(input_tensor)
            return {"detection_boxes": boxes, "detection_scores": scores, "detection_classes": classes,
                    "num_detections": num}

    module = Exported()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return path


def image_with_mean(value):
    return np.full((H, W, 3), value, np.uint8)


@pytest.mark.parametrize("which", ["tf1_model", "tf2_model"])
def test_detector_boxes_scores_classes(which, request):
    det = SavedModelDetector(request.getfixturevalue(which), score_threshold=0.1)
    assert det.mode == ("tensors" if which == "tf1_model" else "signature")
    # bright image: m = 204/255 = 0.8; scores [0.8, 0.2, 0.1, 0.08]; 0.1 kept (>= is inclusive), 0.08 dropped
    out = det.detect(image_with_mean(204))
    assert isinstance(out, Detections)
    np.testing.assert_array_equal(out.boxes, np.array([expected_pixels(b) for b in BOXES[:3]], np.float32))
    np.testing.assert_array_equal(out.boxes[0], [12, 5, 40, 28])
    # not clipped/fixed here: the region stage drops it
    np.testing.assert_array_equal(out.boxes[2], [16, 15, 48, 5])
    np.testing.assert_allclose(out.scores, [0.8, 0.2, 0.1], rtol=1e-6)
    np.testing.assert_array_equal(out.classes, [1, 2, 1])
    assert out.boxes.dtype == np.float32 and out.scores.dtype == np.float32 and out.classes.dtype == np.int64


@pytest.mark.parametrize("which", ["tf1_model", "tf2_model"])
def test_detector_scores_follow_the_input_and_order(which, request):
    det = SavedModelDetector(request.getfixturevalue(which), score_threshold=0.15, max_boxes=2)
    # dark image: m = 51/255 = 0.2 -> scores [0.2, 0.8, 0.1, 0.02]: sorted best first, threshold 0.15
    out = det.detect(image_with_mean(51))
    np.testing.assert_allclose(out.scores, [0.8, 0.2], rtol=1e-6)
    np.testing.assert_array_equal(out.boxes, [[0, 0, 64, 50], [12, 5, 40, 28]])
    np.testing.assert_array_equal(out.classes, [2, 1])
    strict = SavedModelDetector(request.getfixturevalue(which), score_threshold=0.9)
    assert len(strict.detect(image_with_mean(51))) == 0


def test_detector_grayscale_and_empty_image(tf1_model):
    det = SavedModelDetector(tf1_model)
    gray = det.detect(np.full((H, W), 204, np.uint8))
    np.testing.assert_array_equal(gray.boxes, det.detect(image_with_mean(204)).boxes)
    assert len(det.detect(np.zeros((0, 5, 3), np.uint8))) == 0
    with pytest.raises(ValueError, match="uint8"):
        det.detect(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        det.detect(np.zeros((4, 4, 4), np.uint8))


def test_get_proposer_loads_a_savedmodel_path(tf2_model):
    det = get_proposer(str(tf2_model), score_threshold=0.5)
    assert isinstance(det, SavedModelDetector) and det.score_threshold == 0.5
    np.testing.assert_allclose(det.detect(image_with_mean(204)).scores, [0.8], rtol=1e-6)


def test_bad_model_paths(tmp_path):
    with pytest.raises(ValueError, match="not a SavedModel"):
        SavedModelDetector(tmp_path)
    (tmp_path / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(ValueError, match="cannot load"):
        SavedModelDetector(tmp_path)


def test_model_without_image_input_is_refused(tmp_path):
    class Other(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def f(self, x):
            return {"y": x * 2}

    m = Other()
    tf.saved_model.save(m, str(tmp_path / "m"), signatures={"other": m.f})
    with pytest.raises(ValueError, match="serving_default"):
        SavedModelDetector(tmp_path / "m")


def test_normalized_to_pixels_rounding():
    # floor for the min corner, ceil for the max corner, products rounded to float32 first
    out = normalized_to_pixels(np.array([[0.1, 0.2, 0.55, 0.61], [0.0, 0.0, 0.1, 1.0]], np.float32), 50, 64)
    np.testing.assert_array_equal(out, [[12, 5, 40, 28], [0, 0, 64, 5]])
    assert normalized_to_pixels(np.zeros((0, 4)), 10, 10).shape == (0, 4)
    assert np.isnan(normalized_to_pixels([[np.nan, 0, 1, 1]], 10, 10)[0, 1])
