"""Verification of learned features: ``rerank.method: lightglue`` (LightGlue matches, then the usac model fit and
decision rule) and mutual-NN + usac on ALIKED/DISK descriptors; config checks; the per-(feature, method) defaults
of FEATURE_DEFAULTS."""

import numpy as np
import pytest

from d2r.engine.config import FEATURE_DEFAULTS, EngineConfig
from d2r.engine.config import feature_defaults
from d2r.features.base import LocalFeatures
from d2r.query.verify import RerankConfig, geometric_verification, order_verified

from tests.test_features_learned import needs_extra

SIDE = 224


# ---- defaults and checks (no torch) --------------------------------------------------------------------------
def test_defaults_follow_feature_type_and_method():
    c = EngineConfig.from_dict({"features": {"name": "aliked"}})
    assert (c.rerank.method, c.rerank.ratio, c.rerank.lightglue) == ("usac", 1.0, "aliked")
    assert c.rerank.min_inliers == FEATURE_DEFAULTS["aliked"]["rerank.min_inliers"]
    lg = feature_defaults("disk", "lightglue")["rerank.min_inliers"]
    assert EngineConfig().override({"features.name": "disk", "rerank.method": "lightglue"}).rerank.min_inliers == lg
    c2 = EngineConfig.from_dict({"features": {"name": "disk"}, "rerank": {"method": "lightglue"}})
    assert (c2.rerank.min_inliers, c2.rerank.lightglue) == (lg, "disk")
    back = c2.override({"features.name": "rootsift", "rerank.method": "usac"})
    assert (back.rerank.min_inliers, back.rerank.ratio) == (10, 0.8)  # RootSIFT's again
    given = c.override({"rerank.method": "lightglue", "rerank.min_inliers": 33})
    assert given.rerank.min_inliers == 33  # an explicit value wins


def test_lightglue_config_checks():
    with pytest.raises(ValueError, match="needs features.name aliked or disk"):
        EngineConfig().override({"rerank.method": "lightglue"}).check()
    with pytest.raises(ValueError, match="weights are for disk features"):
        EngineConfig.from_dict({"features": {"name": "aliked"}, "rerank": {"method": "lightglue",
                                                                          "lightglue": "disk"}}).check()
    with pytest.raises(ValueError, match="rerank.lightglue"):
        RerankConfig(method="lightglue", lightglue="nowhere.pth").validate()
    with pytest.raises(ValueError, match="rerank.device"):
        RerankConfig(device="tpu").validate()


# ---- with the extra ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def views():
    """Two overlapping views of three photos (shifted, rescaled crops) and the extractors' features of each."""
    import cv2
    from skimage import data

    from d2r.features import get_extractor

    out = {}
    photos = {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}
    for name in ("aliked", "disk"):
        e = get_extractor(name, max_features=300, max_side=SIDE, device="cpu")
        feats = {}
        for key, p in photos.items():
            h, w = p.shape[:2]
            a = p[: h * 4 // 5, : w * 4 // 5]
            b = cv2.resize(np.ascontiguousarray(p[h // 6:, w // 7:]), None, fx=0.8, fy=0.8,
                           interpolation=cv2.INTER_AREA)
            feats[key] = (e.extract(np.ascontiguousarray(a)), e.extract(np.ascontiguousarray(b)))
        out[name] = feats
    return out


@needs_extra
@pytest.mark.parametrize("name", ["aliked", "disk"])
@pytest.mark.parametrize("method", ["lightglue", "usac"])
def test_true_pairs_beat_false_pairs(views, name, method):
    v = views[name]
    config = EngineConfig.from_dict({"features": {"name": name}, "rerank": {"method": method}}).rerank
    config = config.replace(workers=2, device="cpu")
    q = v["astronaut"][0]
    cands = [v["coffee"][1], v["astronaut"][1], v["chelsea"][1], LocalFeatures.empty(128)]
    counts = geometric_verification(q, cands, config)
    assert counts.dtype == np.int64 and counts[3] == 0
    assert counts[1] >= config.min_inliers > max(counts[0], counts[2]), counts
    reverse = geometric_verification(q, cands[1::-1], config)  # a pair's count never depends on the others
    np.testing.assert_array_equal(reverse[::-1], counts[:2])
    ids, _, inl = order_verified(np.array(["coffee", "astronaut", "chelsea"]), [0.9, 0.5, 0.4],
                                 {"coffee": counts[0], "astronaut": counts[1], "chelsea": counts[2]}, config)
    assert ids.tolist() == ["astronaut", "coffee", "chelsea"] and inl[0] == counts[1]


@needs_extra
def test_lightglue_matches_are_index_pairs(views):
    from d2r.query.lightglue import lightglue_matches, matcher

    a, b = views["aliked"]["coffee"]
    (qi, ci), (e1, e2) = lightglue_matches(a, [b, LocalFeatures.empty(128)], "aliked", "cpu")
    assert qi.dtype == ci.dtype == np.int64 and len(qi) > 20 and e1.size == e2.size == 0
    assert (np.diff(qi) > 0).all() and len(np.unique(ci)) == len(ci)  # one-to-one, query ids ascending
    assert qi.max() < len(a) and ci.max() < len(b)
    assert matcher("aliked", "cpu") is matcher("aliked", "cpu")  # one network per process
    assert lightglue_matches(LocalFeatures.empty(128), [b], "aliked", "cpu")[0][0].size == 0
    short = LocalFeatures(a.locations, a.scales, a.scores, np.ascontiguousarray(a.descriptors[:, :64]))
    with pytest.raises(ValueError, match="takes 128-D descriptors, got 64-D"):
        lightglue_matches(short, [b], "aliked", "cpu")


@needs_extra
def test_lightglue_weights_by_path(tmp_path, views):
    from d2r.features import _torch
    from d2r.query.lightglue import Matcher

    own = tmp_path / "lg.pth"
    own.write_bytes(_torch.packaged_weights("disk_lightglue.pth").read_bytes())
    a, b = views["disk"]["chelsea"]
    mine = Matcher(str(own), "cpu").match(a, [b])[0]
    packaged = Matcher("disk", "cpu").match(a, [b])[0]
    np.testing.assert_array_equal(mine[0], packaged[0])
    np.testing.assert_array_equal(mine[1], packaged[1])
    bad = tmp_path / "aliked.pth"
    bad.write_bytes(_torch.packaged_weights("aliked-n16.pth").read_bytes())
    with pytest.raises(ValueError, match="not LightGlue weights"):
        Matcher(str(bad), "cpu")
