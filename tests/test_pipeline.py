"""The shared pipeline: per-feature-type defaults, the override parser, store removals."""

import numpy as np
import pytest

from d2r.config import parse_overrides
from d2r.engine.config import EngineConfig
from d2r.features.base import LocalFeatures
from d2r.features.delf import DELFConfig
from d2r.features.store import FeatureStore
from d2r.codebook.codebook import check_training_size


def test_gv_distance_and_max_side_follow_the_feature_type():
    assert EngineConfig().rerank.descriptor_distance == 0.4  # RootSIFT
    assert EngineConfig.from_dict({"features": {"name": "delf"}}).rerank.descriptor_distance == 0.9
    assert EngineConfig.from_dict({"features": {"name": "delf"},
                                   "rerank": {"descriptor_distance": 0.6}}).rerank.descriptor_distance == 0.6
    # switching the features by override: a value still at the old type's default follows; a set one stays
    assert EngineConfig().override({"features.name": "delf"}).rerank.descriptor_distance == 0.9
    tuned = EngineConfig().override({"rerank.descriptor_distance": 0.5})
    assert tuned.override({"features.name": "delf"}).rerank.descriptor_distance == 0.5
    assert DELFConfig().max_side == 1024  # a phone photo at scale 2.0 must not exhaust memory


def test_parse_overrides_values_and_errors():
    got = parse_overrides(["index.kernel=asmk", "rerank.descriptor_distance=0.5", "regions.max_boxes=null",
                           "features.options.max_features=300", "index.idf=true", "features.pca=a=b"])
    assert got == {"index.kernel": "asmk", "rerank.descriptor_distance": 0.5, "regions.max_boxes": None,
                   "features.options.max_features": 300, "index.idf": True, "features.pca": "a=b"}
    for bad in ["novalue", "=3", "a..b=1", ".a=1"]:
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_overrides([bad])
    c = EngineConfig().override(got)
    assert c.features.options == {"max_features": 300} and c.regions.max_boxes is None and c.index.idf is True


def test_training_size_floor_names_the_option():
    check_training_size(4096, 1024)
    with pytest.raises(ValueError, match=r"too few for K=1024.*--codebook-size \(at most 1023\)"):
        check_training_size(4095, 1024)


def _store(path, ids):
    info = {"name": "rootsift", "fingerprint": "f", "dim": 4}
    with FeatureStore.create(path, info, shard_size=2) as store:
        for k, image_id in enumerate(ids):
            ones = np.ones(k + 1, np.float32)
            store.add(image_id, LocalFeatures(np.full((k + 1, 2), k, np.float32), ones, ones,
                                              np.eye(4, dtype=np.float32)[: k + 1]))
        store.add_failure("bad", "corrupt")


def test_store_remove_keeps_the_rest(tmp_path):
    path = tmp_path / "features"
    _store(path, ["a", "b", "c", "d"])
    with FeatureStore.open(path, "a") as store:
        assert store.remove(["b", "x"]) == 1
    store = FeatureStore.open(path)
    assert store.ids() == ["a", "c", "d"] and store.failures == {"bad": "corrupt"}
    assert len(store.get("c")) == 3 and float(store.get("d").locations[0, 0]) == 3.0
    with FeatureStore.open(path, "a") as store:
        assert store.remove(["x"]) == 0


def test_one_override_parser_for_every_command(tmp_path):
    from d2r.cli import build_parser
    from d2r.cli.bench import config_from_args
    from d2r.cli.index import build_config

    sets = ["--set", "features.options.max_features=300", "--set", "rerank.descriptor_distance=0.5"]
    create = build_parser().parse_args(["index", "create", str(tmp_path / "e"), *sets])
    bench = build_parser().parse_args(["bench", "revisitop", "--gnd", "g.pkl", "--images-root", ".",
                                       "--out", str(tmp_path / "r"), *sets])
    for config in (build_config(create), config_from_args(bench)):
        assert config.features.options == {"max_features": 300} and config.rerank.descriptor_distance == 0.5
