"""Global-descriptor backbones (the [learned] extra): the shipped ImageNet weights load and classify bundled
photos, the extractor is deterministic and flip-symmetric, cirtorch checkpoints load by path, bad files and
settings give one-line errors, and core d2r never needs torch."""

import json
import subprocess
import sys

import numpy as np
import pytest

from d2r.globaldesc.extractor import GlobalConfig

torch = pytest.importorskip("torch", reason='torch not installed (pip install -e ".[learned]")')
skdata = pytest.importorskip("skimage.data")

from d2r.globaldesc import nets  # noqa: E402  (needs torch)
from d2r.globaldesc.extractor import GlobalExtractor, network_head  # noqa: E402

CATS = set(range(281, 286))  # ImageNet tabby, tiger, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def shipped(backbone):
    try:
        return nets.shipped_weights(backbone)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def classify(net, image):
    import cv2

    x = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    x = (x - np.asarray(net.mean, np.float32)) / np.asarray(net.std, np.float32)
    with torch.inference_mode():
        return int(net(torch.from_numpy(x.transpose(2, 0, 1)[None].copy())).argmax())


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite0"])
def test_shipped_weights_classify_bundled_photos(backbone):
    shipped(backbone)
    net = nets.load_backbone(backbone)
    assert classify(net, skdata.chelsea()) in CATS
    assert classify(net, skdata.coffee()) == ESPRESSO


def test_mobilenet_v2_equals_torchvision():
    path = shipped("mobilenet_v2")
    tv = pytest.importorskip("torchvision", reason="torchvision not installed (parity check only)")
    ref = tv.models.mobilenet_v2()
    ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    ours = nets.load_backbone("mobilenet_v2")
    x = torch.randn(1, 3, 160, 120, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(ours.feature_map(x), ref.eval().features(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite0"])
def test_extractor_is_unit_norm_deterministic_and_flip_symmetric(backbone):
    shipped(backbone)
    cat = skdata.chelsea()
    ex = GlobalExtractor(GlobalConfig(backbone=backbone, pooling="gem", size=192, device="cpu"))
    v = ex.extract(cat)
    assert v.shape == (1280,) and v.dtype == np.float32 and ex.dim == 1280
    assert abs(np.linalg.norm(v) - 1) < 1e-5
    np.testing.assert_array_equal(ex.extract(cat), v)  # same input, same threads: the same bits
    two = GlobalExtractor(GlobalConfig(backbone=backbone, pooling="rmac", size=192, flip=True,
                                       scales=(1.0, 0.7071), device="cpu"))
    a, b = two.extract(cat), two.extract(np.ascontiguousarray(cat[:, ::-1]))
    np.testing.assert_allclose(a, b, atol=1e-5)  # two-flip views of a mirror are the same views
    assert float(v @ ex.extract(skdata.coffee())) < float(v @ ex.extract(cat[10:, 15:]))


def test_every_pooling_gives_its_documented_dimension():
    shipped("mobilenet_v2")
    cat = skdata.chelsea()
    base = GlobalExtractor(GlobalConfig(pooling="gap", size=128, device="cpu"))
    maps = base.feature_maps(cat)
    assert len(maps) == 1 and maps[0].shape[0] == 1280 and maps[0].min() >= 0
    for pooling, dim, extra in [("gmp", 1280, {}), ("spoc", 1280, {}), ("crow", 1280, {}), ("scda", 2560, {}),
                                ("rmac", 1280, {}), ("pwa", 3 * 1280, {"pwa_channels": (5, 9, 700)}),
                                ("gem", 3 * 1280, {"pcb_stripes": 2})]:
        ex = GlobalExtractor(GlobalConfig(pooling=pooling, size=128, device="cpu", **extra))
        assert ex.dim == dim
        v = ex.aggregate([ex.pool_map(m) for m in maps])
        assert v.shape == (dim,) and abs(np.linalg.norm(v) - 1) < 1e-5, pooling


# ---- cirtorch checkpoints ----------------------------------------------------------------------------------
# key names of cirtorch's resnet18 ImageRetrievalNet (features = torchvision children[:-2])
CIRTORCH_RESNET18_KEYS = {"features.0.weight", "features.1.running_var", "features.4.0.conv1.weight",
                          "features.4.1.bn2.bias", "features.5.0.downsample.0.weight",
                          "features.5.0.downsample.1.running_mean", "features.7.1.conv2.weight"}


def cirtorch_checkpoint(path, pooling="gem", whiten_dim=64, seed=0):
    torch.manual_seed(seed)
    tv = None
    try:
        import torchvision as tv
    except ImportError:
        pass
    if tv is not None:  # the genuine layout: torchvision's children without avgpool / fc
        feats = torch.nn.Sequential(*list(tv.models.resnet18().children())[:-2])
    else:
        feats = nets.resnet_features("resnet18")
    for mod in feats.modules():  # non-trivial BN statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    state = {f"features.{k}": v for k, v in feats.state_dict().items()}
    assert CIRTORCH_RESNET18_KEYS <= set(state)
    meta = {"architecture": "resnet18", "pooling": pooling, "local_whitening": False, "regional": False,
            "whitening": whiten_dim is not None, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "outputdim": 512,
            "Lw": {"ss": {"m": np.zeros((512, 1)), "P": np.eye(512)}}}  # numpy arrays, as cirtorch saves them
    if pooling == "gem":
        state["pool.p"] = torch.tensor([2.5])
    if whiten_dim is not None:
        state["whiten.weight"] = torch.randn(whiten_dim, 512) / 20
        state["whiten.bias"] = torch.randn(whiten_dim) / 20
    torch.save({"epoch": 3, "meta": meta, "state_dict": state, "min_loss": 0.5}, path)
    return feats.eval(), state


def test_cirtorch_gem_network_loads_by_path_and_its_head_matches_the_formula(tmp_path):
    path = tmp_path / "retrievalSfM120k-resnet18-gem.pth"
    feats, state = cirtorch_checkpoint(path)
    ex = GlobalExtractor(GlobalConfig(backbone=str(path), pooling="network", size=96, device="cpu"))
    assert ex.dim == 64 and ex.head["p"] == pytest.approx(2.5)
    image = skdata.chelsea()
    (fmap,) = ex.feature_maps(image)
    x = ((image[:72, :96] / 255.0 - 0.45) / 0.22).astype(np.float32)
    x = torch.from_numpy(x.transpose(2, 0, 1)[None].copy())
    with torch.inference_mode():  # the loaded convolutions equal the network that was saved
        torch.testing.assert_close(ex.net.feature_map(x), feats(x), rtol=1e-5, atol=1e-5)
    g = (np.maximum(fmap.astype(np.float64), 1e-6) ** 2.5).mean(axis=(1, 2)) ** (1 / 2.5)
    g /= np.linalg.norm(g)
    w = state["whiten.weight"].numpy().astype(np.float64) @ g + state["whiten.bias"].numpy()
    np.testing.assert_allclose(ex.extract(image), w / np.linalg.norm(w), atol=1e-5)
    np.testing.assert_allclose(network_head(fmap, ex.head), w, rtol=1e-4, atol=1e-5)
    ours = GlobalExtractor(GlobalConfig(backbone=str(path), pooling="mac", size=96, device="cpu"))
    assert ours.dim == 512  # the same network under d2r's own pooling


def test_bad_checkpoints_give_one_line_errors_naming_the_file(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError) as exc:
        GlobalExtractor(GlobalConfig(backbone=str(junk), pooling="network", device="cpu"))
    assert str(junk) in str(exc.value) and "\n" not in str(exc.value)
    path = tmp_path / "net.pth"
    _, state = cirtorch_checkpoint(path, whiten_dim=None)
    del state["features.7.1.conv2.weight"]
    ckpt = torch.load(path, weights_only=False)
    ckpt["state_dict"] = state
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"net.pth: not a cirtorch resnet18 state dict: keys 1 missing"):
        GlobalExtractor(GlobalConfig(backbone=str(path), pooling="network", device="cpu"))
    ckpt["meta"]["architecture"] = "densenet121"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="architecture 'densenet121' is not supported"):
        GlobalExtractor(GlobalConfig(backbone=str(path), device="cpu"))
    wrong = tmp_path / "wrong.pth"
    torch.save(nets.EfficientNetLite0().state_dict(), wrong)
    with pytest.raises(ValueError, match="not a mobilenet_v2 state dict"):
        GlobalExtractor(GlobalConfig(backbone="mobilenet_v2", weights=str(wrong), device="cpu"))


# ---- configuration and the optional dependency -------------------------------------------------------------
@pytest.mark.parametrize("settings, match", [
    ({"backbone": "resnet9000"}, "global.backbone"),
    ({"pooling": "vlad"}, "global.pooling"),
    ({"pooling": "network"}, "global.pooling"),
    ({"pooling": "pwa"}, "global.pwa_channels"),
    ({"gem_p": 0.0}, "global.gem_p"),
    ({"scales": []}, "global.scales"),
    ({"resize": "fit"}, "global.resize"),
    ({"crop": "five"}, "global.crop"),
    ({"whitening": "/nonexistent.npz"}, "global.whitening"),
    ({"device": "tpu"}, "global.device"),
])
def test_config_check_names_the_option(settings, match):
    with pytest.raises(ValueError, match=match):
        GlobalConfig(**settings).check()


def test_config_loads_from_a_mapping_and_dotted_overrides():
    cfg = GlobalConfig.from_dict({"backbone": "efficientnet_lite0", "scales": [1, 0.7071, 0.5], "flip": True})
    assert cfg.check().scales == (1, 0.7071, 0.5)
    assert cfg.override({"pooling": "rmac"}).pooling == "rmac"
    with pytest.raises(ValueError, match="unknown option"):
        GlobalConfig.from_dict({"bacbone": "x"})
    assert json.dumps(cfg.to_dict())


def test_core_never_imports_torch_and_a_missing_torch_is_one_line():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import d2r.globaldesc as g\n"
            "idx = g.GlobalIndex(4); idx.add([1], [[1, 0, 0, 0]]); print(idx.search([1, 0, 0, 0], 1)[0])\n"
            "try:\n    g.GlobalExtractor()\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[1]" in out.stdout
    want = 'ERR global descriptors need torch, which is not installed: pip install -e ".[learned]"'
    assert want in out.stdout


def test_cuda_without_a_gpu_is_refused_before_loading_anything():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="global.device=cuda: torch sees no CUDA device"):
        GlobalExtractor(GlobalConfig(device="cuda"))
