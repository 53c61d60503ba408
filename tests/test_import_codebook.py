"""Import of official codebooks: TF checkpoints written here with TensorFlow, in both layouts the official
code produces (TF1 name-based ``clusters`` from the estimator KMeans; TF2
``tf.train.Checkpoint(codebook=...)``)."""

import json

import numpy as np
import pytest

from d2r.cli import main as cli_main
from d2r.codebook import Codebook
from d2r.codebook.official import find_clusters_variable, import_official_codebook, read_official_codebook

import tensorflow as tf  # a hard dependency: a broken install must fail, not skip


def tf1_checkpoint(tmp_path, centroids, extra=True):
    """Name-based checkpoint as the TF1 estimator KMeans writes it: variable 'clusters' + bookkeeping."""
    prefix = tmp_path / "k_codebook_tfckpt" / "codebook"
    prefix.parent.mkdir()
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.get_variable("clusters", initializer=tf.constant(centroids))
        if extra:
            tf.compat.v1.get_variable("clusters_initialized", initializer=tf.constant(True))
            tf.compat.v1.get_variable("total_counts", initializer=tf.zeros([centroids.shape[0]], tf.int64))
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(prefix), write_meta_graph=False)
    return prefix


def tf2_checkpoint(tmp_path, centroids):
    """The object-based layout of the official TF2 loader: Checkpoint(codebook=Variable 'clusters')."""
    prefix = tmp_path / "tf2" / "codebook"
    var = tf.Variable(centroids, name="clusters")
    tf.train.Checkpoint(codebook=var).write(str(prefix))
    return prefix


@pytest.fixture
def centroids(rng):
    return rng.standard_normal((32, 128)).astype(np.float32)


def test_tf1_name_based_layout(tmp_path, centroids):
    prefix = tf1_checkpoint(tmp_path, centroids)
    values, key = read_official_codebook(prefix)
    assert key == "clusters"
    assert values.dtype == np.float32 and np.array_equal(values, centroids)
    book = import_official_codebook(prefix, dim=128, k=32, metadata={"trainset": "rparis6k"})
    assert np.array_equal(book.centroids, centroids)
    assert book.metadata["feature"] == "delf" and book.metadata["checkpoint_variable"] == "clusters"
    assert book.metadata["trainset"] == "rparis6k" and book.metadata["training_source"] == str(prefix)
    # the folder works too (its 'checkpoint' file names the latest prefix)
    assert np.array_equal(read_official_codebook(prefix.parent)[0], centroids)


def test_tf2_object_layout_and_official_restore(tmp_path, centroids):
    prefix = tf2_checkpoint(tmp_path, centroids)
    values, key = read_official_codebook(prefix)
    assert key == "codebook/.ATTRIBUTES/VARIABLE_VALUE" and np.array_equal(values, centroids)
    # the TF1 file restores into the official TF2 loader's variable as well, and agrees with our import
    prefix1 = tf1_checkpoint(tmp_path, centroids)
    var = tf.Variable(tf.zeros([32, 128]), name="clusters")
    tf.train.Checkpoint(codebook=var).restore(str(prefix1)).expect_partial()
    assert np.array_equal(var.numpy(), import_official_codebook(prefix1).centroids)


def test_assignments_match_tensorflow(tmp_path, centroids, rng):
    book = import_official_codebook(tf1_checkpoint(tmp_path, centroids))
    x = rng.standard_normal((50, 128)).astype(np.float32)
    d = tf.reduce_sum(tf.math.squared_difference(x[:, None, :], centroids[None]), axis=2)
    assert np.array_equal(book.assign(x)[:, 0], tf.argmin(d, axis=1).numpy())


def test_find_clusters_variable():
    names = ["global_step", "kmeans/clusters", "clusters_initialized"]
    assert find_clusters_variable(names) == "kmeans/clusters"
    names = ["codebook/.ATTRIBUTES/VARIABLE_VALUE", "_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert find_clusters_variable(names) == "codebook/.ATTRIBUTES/VARIABLE_VALUE"
    with pytest.raises(ValueError, match="no variable named 'clusters'"):
        find_clusters_variable(["w", "b"])
    with pytest.raises(ValueError, match="several"):
        find_clusters_variable(["a/clusters", "b/clusters"])


def test_bad_checkpoints(tmp_path, centroids):
    with pytest.raises(FileNotFoundError, match="no TensorFlow checkpoint"):
        read_official_codebook(tmp_path / "missing")
    prefix = tf1_checkpoint(tmp_path, centroids)
    with pytest.raises(ValueError, match="expected D=40"):
        import_official_codebook(prefix, dim=40)
    with pytest.raises(ValueError, match="expected K=65536"):
        import_official_codebook(prefix, k=65536)
    with pytest.raises(ValueError, match="expected a 2-D"):
        read_official_codebook(prefix, variable="total_counts")
    with pytest.raises(ValueError, match="no variable 'nope'"):
        read_official_codebook(prefix, variable="nope")
    other = tmp_path / "other"
    tf.train.Checkpoint(w=tf.Variable(np.ones((2, 2), np.float32))).write(str(other / "ck"))
    with pytest.raises(ValueError, match="no variable named 'clusters'"):
        read_official_codebook(other / "ck")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ck.index").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        read_official_codebook(broken / "ck")


def test_cli_import(tmp_path, centroids, capsys):
    prefix = tf1_checkpoint(tmp_path, centroids)
    out = tmp_path / "delf-128d-k32-rparis6k-official.npz"
    args = ["import-codebook", str(prefix), "--out", str(out), "--trainset", "rparis6k", "--dim", "128",
            "--json", "--quiet"]
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["k"] == 32 and summary["D"] == 128 and summary["variable"] == "clusters"
    book = Codebook.load(out)
    assert book.fingerprint == summary["fingerprint"] and np.array_equal(book.centroids, centroids)
    assert book.metadata["trainset"] == "rparis6k"
    assert cli_main(args) == 1
    assert "exists" in capsys.readouterr().err
    assert cli_main(args + ["--force"]) == 0
    capsys.readouterr()
    assert cli_main(["import-codebook", str(tmp_path / "nope"), "--out", str(tmp_path / "x.npz")]) == 1
    assert "no TensorFlow checkpoint" in capsys.readouterr().err
