"""Ray scale-out: distributed Lloyd, sharded index, distributed extraction — each against its one-machine twin.

A local Ray cluster (2 CPUs, loopback) is started once for the module."""

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from d2r.train import train_codebook  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    import d2r.distributed as dist

    ray_mod, started = dist.init(num_cpus=2)
    yield ray_mod
    if started:
        ray_mod.shutdown()


def _blobs(n, d, centres, seed):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)) * 4
    return (c[rng.integers(0, centres, n)] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("workers", [2, 3])
def test_distributed_lloyd_equals_single_machine(cluster, workers):
    from d2r.distributed import train_codebook as train_ray

    x = _blobs(3000, 16, 30, seed=workers)
    k = 40
    init = x[np.random.default_rng(1).choice(len(x), k, replace=False)].copy()
    init[5] = init[4]  # duplicate centroid: cluster 5 is empty after the first assignment
    init[7] = init[4]
    init[9] = 1e3  # far away: empty
    one, info1 = train_codebook(x, k, iterations=6, init=init, progress=False)
    dist, info2 = train_ray(x, k, iterations=6, init=init, progress=False, workers=workers)
    assert info2["workers"] == workers
    assert info1["repairs"][0] == 3 and info2["repairs"] == info1["repairs"]
    assert info2["iterations"] == info1["iterations"]
    np.testing.assert_allclose(dist.centroids, one.centroids, rtol=0, atol=1e-5)
    np.testing.assert_allclose(info2["inertia"], info1["inertia"], rtol=1e-9)


def test_distributed_lloyd_seeded_init_and_checks(cluster):
    from d2r.distributed import train_codebook as train_ray

    x = _blobs(1000, 8, 10, seed=5)
    one, _ = train_codebook(x, 12, iterations=4, init="k-means++", seed=3, progress=False)
    dist, _ = train_ray(x, 12, iterations=4, init="k-means++", seed=3, progress=False, workers=2)
    np.testing.assert_allclose(dist.centroids, one.centroids, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="lloyd"):
        train_ray(x, 12, method="minibatch", progress=False)
    with pytest.raises(ValueError, match="larger than"):
        train_ray(x, 5000, progress=False)


def test_train_codebook_cli_ray(cluster, tmp_path, capsys):
    from d2r.cli import main
    from d2r.codebook import Codebook

    x = _blobs(1500, 8, 12, seed=9)
    np.save(tmp_path / "x.npy", x)
    common = ["train-codebook", "--descriptors", str(tmp_path / "x.npy"), "-k", "16", "--iterations", "4",
              "--init", "random", "--quiet"]
    assert main(common + ["--out", str(tmp_path / "one.npz")]) == 0
    assert main(common + ["--out", str(tmp_path / "ray.npz"), "--ray"]) == 0
    np.testing.assert_allclose(Codebook.load(tmp_path / "ray.npz").centroids,
                               Codebook.load(tmp_path / "one.npz").centroids, rtol=0, atol=1e-5)
    assert main(common + ["--out", str(tmp_path / "mb.npz"), "--ray", "--method", "minibatch"]) == 1
    assert "--ray runs --method lloyd" in capsys.readouterr().err
