"""Region extraction (whole image + boxes), region proposers and the region table, on real OpenCV SIFT."""

import logging

import cv2
import numpy as np
import pytest
from PIL import Image

from d2r.detect import (
    DensityProposer,
    Detections,
    GridProposer,
    ImageRegions,
    NoProposer,
    extract_regions,
    get_proposer,
    region_table,
)
from d2r.features.base import LocalFeatures, RegionFeatures


class SiftExtractor:
    """Tiny real extractor: OpenCV SIFT keypoints + L2-normalised descriptors (no features under 10×10)."""

    dim = 128

    def __init__(self, nfeatures=300):
        self.nfeatures = nfeatures

    def extract(self, image):
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
        if min(gray.shape[:2]) < 10:
            return LocalFeatures.empty(self.dim)
        sift = cv2.SIFT_create(nfeatures=self.nfeatures)
        kps, desc = sift.detectAndCompute(np.ascontiguousarray(gray), None)
        if desc is None or not kps:
            return LocalFeatures.empty(self.dim)
        desc = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
        return LocalFeatures(
            np.array([k.pt for k in kps], np.float32),
            np.array([k.size for k in kps], np.float32),
            np.array([k.response for k in kps], np.float32),
            desc.astype(np.float32),
        )


class FixedBoxes:
    """A proposer that returns given pixel boxes (stands for any detector's output)."""

    def __init__(self, boxes, scores=None):
        self.boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        self.scores = np.linspace(0.9, 0.5, len(self.boxes)) if scores is None else scores

    def detect(self, image):
        return Detections.create(self.boxes, self.scores)


class Failing:
    def detect(self, image):
        raise RuntimeError("boom")


@pytest.fixture(scope="module")
def photo(bundled_photos):
    im = Image.fromarray(bundled_photos["astronaut"])
    im.thumbnail((320, 320))
    return np.asarray(im)


@pytest.fixture(scope="module")
def sift():
    return SiftExtractor()


def same_features(a, b):
    np.testing.assert_array_equal(a.locations, b.locations)
    np.testing.assert_array_equal(a.scales, b.scales)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.descriptors, b.descriptors)


BOXES = [[10, 20, 150, 140], [60, 5, 200, 100], [100, 50, 107, 57]]  # the last one is too small for SIFT


def test_reextraction_equals_hand_cropping(photo, sift):
    h, w = photo.shape[:2]
    rf = extract_regions(photo, sift, FixedBoxes(BOXES))
    assert isinstance(rf, RegionFeatures) and isinstance(rf, ImageRegions) and not rf.failed
    assert rf.num_regions == 4
    np.testing.assert_array_equal(rf.box_ids, [-1, 0, 1, 2])
    np.testing.assert_array_equal(rf.boxes, [[0, 0, w, h]] + BOXES)
    np.testing.assert_allclose(rf.box_scores, [1.0, 0.9, 0.7, 0.5])
    same_features(rf.region(0), sift.extract(photo))
    for r, (x1, y1, x2, y2) in enumerate(BOXES, start=1):
        hand = sift.extract(np.ascontiguousarray(photo[y1:y2, x1:x2]))
        got = rf.region(r)
        assert len(got) == len(hand)
        np.testing.assert_array_equal(got.locations, hand.locations + np.array([x1, y1], np.float32))
        np.testing.assert_array_equal(got.descriptors, hand.descriptors)
        np.testing.assert_array_equal(got.scales, hand.scales)
        np.testing.assert_array_equal(got.scores, hand.scores)
    assert rf.counts[1] > 20 and rf.counts[2] > 20 and rf.counts[3] == 0
    assert int(rf.counts.sum()) == len(rf.features)


def test_reextracted_locations_lie_in_their_box(photo, sift):
    rf = extract_regions(photo, sift, GridProposer(levels=2))
    assert rf.num_regions > 3
    for r in range(1, rf.num_regions):
        x1, y1, x2, y2 = rf.boxes[r]
        loc = rf.region(r).locations
        assert len(loc) > 0
        assert (loc[:, 0] >= x1).all() and (loc[:, 0] < x2).all()
        assert (loc[:, 1] >= y1).all() and (loc[:, 1] < y2).all()


def test_keypoint_assignment_mode(photo, sift):
    boxes = [[10, 20, 150, 140], [60, 5, 200, 100]]  # overlapping
    rf = extract_regions(photo, sift, FixedBoxes(boxes), reextract=False)
    whole = sift.extract(photo)
    same_features(rf.region(0), whole)
    for r, (x1, y1, x2, y2) in enumerate(boxes, start=1):
        idx = [i for i, (x, y) in enumerate(whole.locations) if x1 <= x < x2 and y1 <= y < y2]
        same_features(rf.region(r), whole.select(np.array(idx, np.int64)))
    # keypoints in the overlap [60, 150) x [20, 100) belong to both boxes
    both = whole.locations[[i for i, (x, y) in enumerate(whole.locations) if 60 <= x < 150 and 20 <= y < 100]]
    assert len(both) > 0
    for r in (1, 2):
        loc = {tuple(p) for p in rf.region(r).locations.tolist()}
        assert all(tuple(p) in loc for p in both.tolist())


def test_grid_geometry_by_hand():
    # W=100, H=60, R-MAC levels 1..3, overlap 0.4 (see grid_positions' rule):
    # l=1 side 60: x n = 1+ceil(40/36)=3 -> 0,20,40; y -> 0
    # l=2 side 40: x n = 1+ceil(60/24)=4 -> 0,20,40,60; y n = 1+ceil(20/24)=2 -> 0,20
    # l=3 side 30: x n = 1+ceil(70/18)=5 -> floor(0,17.5,35,52.5,70); y n = 1+ceil(30/18)=3 -> 0,15,30
    dets = GridProposer(levels=3, overlap=0.4).detect(np.zeros((60, 100, 3), np.uint8))
    expected = []
    for side, xs, ys in [(60, [0, 20, 40], [0]), (40, [0, 20, 40, 60], [0, 20]),
                         (30, [0, 17, 35, 52, 70], [0, 15, 30])]:
        expected += [[x, y, x + side, y + side] for y in ys for x in xs]
    np.testing.assert_array_equal(dets.boxes, np.array(expected, np.float32))
    np.testing.assert_array_equal(dets.classes, [1] * 3 + [2] * 8 + [3] * 15)
    assert (dets.scores == 1.0).all()
    # square image: the level-1 square is the whole image, left out unless skip_full=False
    sq = GridProposer().detect(np.zeros((90, 90), np.uint8))
    assert len(sq) == 4 + 9 and [0, 0, 90, 90] not in sq.boxes.tolist()
    np.testing.assert_array_equal(sq.boxes[:4],
                                  [[0, 0, 60, 60], [30, 0, 90, 60], [0, 30, 60, 90], [30, 30, 90, 90]])
    assert len(GridProposer(skip_full=False).detect(np.zeros((90, 90), np.uint8))) == 14
    assert len(GridProposer(max_boxes=5).detect(np.zeros((60, 100), np.uint8))) == 5
    assert len(GridProposer(min_side=8).detect(np.zeros((5, 100), np.uint8))) == 0


def test_grid_overlap_rule_random_sizes(rng):
    for _ in range(50):
        w, h = rng.integers(20, 2000, size=2)
        for det_box in GridProposer(levels=3, min_side=1).detect(np.zeros((h, w), np.uint8)).boxes:
            x1, y1, x2, y2 = det_box
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and x2 - x1 == y2 - y1
        from d2r.detect.proposers import grid_positions
        side = int(min(w, h) * 2 // 4)
        pos = grid_positions(int(max(w, h)), side, 0.4)
        assert pos[0] == 0 and pos[-1] == max(w, h) - side
        steps = np.diff(pos)
        assert (steps <= side * 0.6 + 1).all()  # consecutive overlap >= 40% (up to the pixel floor)
        if len(pos) > 2:  # one square fewer would not reach 40%
            assert (max(w, h) - side) / (len(pos) - 2) > side * 0.6


def planted_cluster(rng, w=400, h=300):
    uniform = rng.uniform([0, 0], [w, h], size=(300, 2))
    cluster = rng.normal([300, 80], 8, size=(150, 2))
    loc = np.concatenate([uniform, cluster]).astype(np.float32)
    scores = rng.uniform(0, 1, len(loc)).astype(np.float32)
    n = len(loc)
    return LocalFeatures(loc, np.ones(n, np.float32), scores, np.zeros((n, 4), np.float32)), cluster


def test_density_finds_a_planted_cluster(rng):
    feats, cluster = planted_cluster(rng)
    dets = DensityProposer().detect(np.zeros((300, 400, 3), np.uint8), features=feats)
    assert len(dets) == 1
    x1, y1, x2, y2 = dets.boxes[0]
    inside = (cluster[:, 0] >= x1) & (cluster[:, 0] < x2) & (cluster[:, 1] >= y1) & (cluster[:, 1] < y2)
    assert inside.mean() > 0.95
    assert (x2 - x1) * (y2 - y1) < 0.1 * 400 * 300  # tight: the cluster, not the image
    assert 0 < dets.scores[0] <= 1 and dets.scores[0] > 0.25
    # deterministic
    again = DensityProposer().detect(np.zeros((300, 400, 3), np.uint8), features=feats)
    np.testing.assert_array_equal(again.boxes, dets.boxes)


def test_density_uniform_keypoints_give_no_box(rng):
    loc = rng.uniform([0, 0], [400, 300], size=(1000, 2))
    assert len(DensityProposer().boxes_from_keypoints(loc, np.ones(1000), 400, 300)) == 0
    assert len(DensityProposer().boxes_from_keypoints(np.zeros((0, 2)), np.zeros(0), 400, 300)) == 0


def test_density_on_real_sift_keypoints(rng):
    image = np.full((240, 320, 3), 128, np.uint8)
    image[40:110, 200:280] = rng.integers(0, 256, size=(70, 80, 1), dtype=np.uint8)  # textured patch
    dets = DensityProposer().detect(image)  # OpenCV SIFT keypoints
    assert len(dets) >= 1
    x1, y1, x2, y2 = dets.boxes[0]
    ix = max(0, min(x2, 280) - max(x1, 200)) * max(0, min(y2, 110) - max(y1, 40))
    iou = ix / ((x2 - x1) * (y2 - y1) + 70 * 80 - ix)
    assert iou > 0.5


def test_density_proposer_reuses_whole_image_features(photo, sift):
    prop = DensityProposer(min_area_fraction=0.01)
    rf = extract_regions(photo, sift, prop)
    want = prop.detect(photo, features=sift.extract(photo))
    np.testing.assert_array_equal(rf.boxes[1:], want.boxes)
    np.testing.assert_array_equal(rf.box_scores[1:], want.scores)


def test_degenerate_boxes_are_clipped_or_dropped(photo, sift, caplog):
    h, w = photo.shape[:2]
    boxes = [
        [np.nan, 0, 10, 10],
        [0, 0, np.inf, 10],
        [-50, -50, -10, -10],  # fully outside
        [w + 5, 0, w + 50, 20],  # fully outside on the right
        [10, 10, 10, 20],  # zero area
        [30, 20, 10, 40],  # negative width
        [-5, -5, 50, 40],  # clipped -> [0, 0, 50, 40]
        [5.5, 6.2, 20.1, 30.9],  # snapped outwards -> [5, 6, 21, 31]
        [w - 20, h - 20, w + 20, h + 20],  # clipped to the corner
    ]
    with caplog.at_level(logging.WARNING, logger="d2r.detect.regions"):
        rf = extract_regions(photo, sift, FixedBoxes(boxes), name="photo.jpg")
    assert rf.dropped_boxes == 6 and not rf.failed
    np.testing.assert_array_equal(rf.box_ids, [-1, 6, 7, 8])
    np.testing.assert_array_equal(rf.boxes[1:], [[0, 0, 50, 40], [5, 6, 21, 31], [w - 20, h - 20, w, h]])
    assert any("photo.jpg" in r.message and "dropped 6 of 9" in r.message for r in caplog.records)
    same_features(rf.region(1), sift.extract(np.ascontiguousarray(photo[0:40, 0:50])).select(slice(None)))


def test_failing_detector_keeps_the_whole_image(photo, sift, caplog):
    with caplog.at_level(logging.WARNING, logger="d2r.detect.regions"):
        results = [extract_regions(im, sift, p, name=n) for im, p, n in
                   [(photo, Failing(), "bad.jpg"), (photo, FixedBoxes(BOXES[:1]), "good.jpg")]]
    bad, good = results
    assert bad.failed and bad.detector_error == "RuntimeError: boom"
    assert bad.num_regions == 1 and bad.box_ids.tolist() == [-1]
    same_features(bad.region(0), sift.extract(photo))
    assert not good.failed and good.num_regions == 2
    assert any("bad.jpg" in r.message and "boom" in r.message for r in caplog.records)


def test_detector_returning_the_wrong_type_is_a_failure(photo, sift):
    class Wrong:
        def detect(self, image):
            return [[0, 0, 5, 5]]

    rf = extract_regions(photo, sift, Wrong())
    assert rf.failed and "TypeError" in rf.detector_error and rf.num_regions == 1


def test_no_proposer_and_tiny_image(photo, sift):
    for prop in (None, NoProposer(), get_proposer("none")):
        rf = extract_regions(photo, sift, prop)
        assert rf.num_regions == 1 and rf.counts[0] > 0
    tiny = extract_regions(np.zeros((6, 7, 3), np.uint8), sift, GridProposer(min_side=1))
    assert len(tiny.features) == 0 and (tiny.counts == 0).all() and tiny.features.dim == 128
    np.testing.assert_array_equal(tiny.boxes[0], [0, 0, 7, 6])
    with pytest.raises(ValueError, match="non-empty"):
        extract_regions(np.zeros((0, 4, 3), np.uint8), sift)
    with pytest.raises(ValueError, match="non-empty"):
        extract_regions([[1, 2]], sift)


def test_get_proposer_registry():
    assert isinstance(get_proposer("grid", levels=2), GridProposer)
    assert get_proposer("grid", levels=2).levels == 2
    assert isinstance(get_proposer("Density"), DensityProposer)
    obj = GridProposer()
    assert get_proposer(obj) is obj
    with pytest.raises(ValueError, match="unknown proposer 'rmac'"):
        get_proposer("rmac")
    with pytest.raises(ValueError, match="levels"):
        get_proposer("grid", levels=0)
    with pytest.raises(ValueError, match="min_area_fraction"):
        DensityProposer(min_area_fraction=1.5)


def test_region_table_and_official_mapping_csv(photo, sift, tmp_path):
    a = extract_regions(photo, sift, FixedBoxes(BOXES[:2]))
    b = extract_regions(photo, sift, Failing())
    table = region_table(["all_souls_000013", "radcliffe_camera_000158"], [a, b])
    assert table.names.tolist() == ["all_souls_000013", "all_souls_000013_0", "all_souls_000013_1",
                                    "radcliffe_camera_000158"]
    np.testing.assert_array_equal(table.image_index, [0, 0, 0, 1])
    np.testing.assert_array_equal(table.box_ids, [-1, 0, 1, -1])
    assert table.image_ids.tolist() == ["all_souls_000013"] * 3 + ["radcliffe_camera_000158"]
    np.testing.assert_array_equal(table.boxes, np.concatenate([a.boxes, b.boxes]))
    np.testing.assert_array_equal(table.box_scores, np.concatenate([a.box_scores, b.box_scores]))
    text = table.to_csv(tmp_path / "index_mapping.csv")
    assert text == ("name,index_image_id,box_id\nall_souls_000013,0,-1\nall_souls_000013_0,0,0\n"
                    "all_souls_000013_1,0,1\nradcliffe_camera_000158,1,-1\n")
    assert (tmp_path / "index_mapping.csv").read_text() == text
    assert len(region_table([], [])) == 0
    with pytest.raises(ValueError, match="2 image ids but 1"):
        region_table(["a", "b"], [a])


def test_regions_config_builds_proposers(tmp_path):
    from d2r.detect import RegionsConfig

    cfg = RegionsConfig.from_dict({"proposer": "grid", "max_boxes": 3, "options": {"levels": 2}})
    prop = cfg.build_proposer()
    assert isinstance(prop, GridProposer) and prop.levels == 2 and prop.max_boxes == 3
    assert cfg.to_dict() == {"proposer": "grid", "score_threshold": 0.1, "max_boxes": 3, "reextract": True,
                             "options": {"levels": 2}}
    assert isinstance(RegionsConfig().build_proposer(), NoProposer)
    assert isinstance(RegionsConfig(proposer="density").build_proposer(), DensityProposer)
    with pytest.raises(ValueError, match="unknown"):
        RegionsConfig.from_dict({"detector": "grid"})
    with pytest.raises(ValueError, match="unknown proposer"):
        RegionsConfig(proposer=str(tmp_path / "missing")).build_proposer()


def test_regions_feed_regional_aggregation(photo, sift):
    from d2r.aggregate import Aggregator
    from d2r.codebook import Codebook

    rf = extract_regions(photo, sift, FixedBoxes(BOXES))
    codebook = Codebook(rf.features.descriptors[::17][:16].copy())
    agg = Aggregator(codebook, "asmk_star")
    regional = agg(rf.features.descriptors, regions=rf.counts)
    assert regional.num_regions == rf.num_regions == 4 and len(regional) > 0
    per_region = agg.per_region(rf.features.descriptors, rf.counts)
    assert len(per_region) == 4 and per_region[3].is_empty and not per_region[1].is_empty
