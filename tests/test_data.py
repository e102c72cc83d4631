"""Tests for fcfn_jax.data: loading (npz, shared real files, embedded, tfds via mock), partitions, packing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fcfn_jax import data
from fcfn_jax.config import DataConfig
from fcfn_jax.validate import ConfigError

from .cli import import_script

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LEAF_FILE = SHARED / "femnist_leaf_subset.npz"
needs_shared = pytest.mark.skipif(
  not all((SHARED / name).is_file() for name in (LEAF_FILE.name, *data.CIFAR10_FILES)),
  reason=f"the shared real data ({SHARED}) is not available",
)


def _random_dataset(n=60, num_classes=5, shape=(4, 4, 1), seed=0, num_writers=None) -> data.Dataset:
  rng = np.random.default_rng(seed)
  groups = None if num_writers is None else rng.integers(0, num_writers, n)
  return data.make_dataset(
    rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, num_classes, n), num_classes, groups
  )


def _project_arrays(n_train=30, n_test=10, shape=(28, 28, 1), num_classes=10, writers=True) -> dict:
  rng = np.random.default_rng(1)
  arrays = {"num_classes": np.array(num_classes)}
  for split, n in (("train", n_train), ("test", n_test)):
    arrays[f"{split}_image"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    arrays[f"{split}_label"] = rng.integers(0, num_classes, n)
    if writers:
      arrays[f"{split}_writer"] = rng.integers(0, 5, n)
  return arrays


def _save(tmp_path: Path, arrays: dict, name="data.npz") -> Path:
  path = tmp_path / name
  np.savez(path, **arrays)
  return path


def _assert_covers_once(clients, n):
  np.testing.assert_array_equal(np.sort(np.concatenate(clients)), np.arange(n))


# ----------------------------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------------------------


def test_project_npz_roundtrip(tmp_path):
  arrays = _project_arrays()
  splits = data.load_npz(_save(tmp_path, arrays))
  for split, loaded in zip(("train", "test"), splits):
    np.testing.assert_array_equal(loaded.x, arrays[f"{split}_image"])
    np.testing.assert_array_equal(loaded.y, arrays[f"{split}_label"])
    np.testing.assert_array_equal(loaded.groups, arrays[f"{split}_writer"])
    assert loaded.x.dtype == np.uint8 and loaded.y.dtype == np.int32 and loaded.groups.dtype == np.int32
    assert loaded.num_classes == 10


def test_project_npz_without_writers_has_no_groups(tmp_path):
  path = _save(tmp_path, _project_arrays(writers=False))
  assert data.load_npz(path).train.groups is None
  cfg = DataConfig(source="npz", path=str(path), num_clients=2, min_examples_per_client=1)
  with pytest.raises(ConfigError, match="writer ids"):
    data.load_federated(cfg)
  assert (
    data.load_federated(
      DataConfig(source="npz", path=str(path), partition="iid", num_clients=3, min_examples_per_client=1)
    ).pool.num_examples.sum()
    == 30
  )


def test_leaf_layout_inverts_and_splits(tmp_path):
  # Writer 0 has LEAF train and test parts; writer 1 has only its test part (the per-writer fallback).
  x = np.full((30, 28, 28), 255, np.uint8)
  x[:, 10, 10] = 3
  writer = np.repeat([0, 1], [20, 10])
  leaf_split = np.array([0] * 15 + [1] * 5 + [1] * 10, np.uint8)
  path = _save(tmp_path, {"x": x, "y": np.arange(30) % 62, "writer": writer, "leaf_split": leaf_split})
  splits = data.load_npz(path, test_fraction=0.3, seed=0)
  assert splits.train.x.shape[1:] == (28, 28, 1) and splits.train.num_classes == 62
  assert splits.train.x.max() == 252 and splits.train.x[:, 0, 0].max() == 0  # MNIST style: 0 = background
  np.testing.assert_array_equal(np.sort(splits.test.y[splits.test.groups == 0]), np.arange(15, 20))
  assert np.sum(splits.test.groups == 1) == 3 and np.sum(splits.train.groups == 1) == 7
  again = data.load_npz(path, test_fraction=0.3, seed=0)
  np.testing.assert_array_equal(again.test.y, splits.test.y)


@needs_shared
def test_shared_femnist_file():
  with np.load(LEAF_FILE) as raw:
    raw_x, writer, leaf_split = raw["x"], raw["writer"], raw["leaf_split"]
  splits = data.load_npz(LEAF_FILE)
  assert len(splits.train.y) + len(splits.test.y) == 55_950
  assert splits.train.x.shape[1:] == (28, 28, 1) and splits.train.num_classes == 62
  assert np.median(splits.train.x) == 0  # MNIST style
  # A writer with a LEAF train part keeps LEAF's split, inverted.
  w = writer[np.flatnonzero(leaf_split == 0)[0]]
  for split, code in zip(splits, (0, 1)):
    np.testing.assert_array_equal(
      split.x[split.groups == w, ..., 0], 255 - raw_x[(writer == w) & (leaf_split == code)]
    )


@needs_shared
def test_shared_cifar10_directory():
  splits = data.load_npz(SHARED)
  for split in splits:
    assert split.x.shape == (10_000, 32, 32, 3) and split.num_classes == 10 and split.groups is None
  np.testing.assert_array_equal(np.bincount(splits.test.y), np.full(10, 1000))


@needs_shared
def test_shared_femnist_digits_federated():
  cfg = DataConfig(source="npz", path=str(LEAF_FILE), digits_only=True, num_clients=30, test_examples=500)
  fed = data.load_federated(cfg)
  assert fed.num_classes == 10 and fed.input_shape == (28, 28, 1) and fed.test.y.max() < 10
  assert fed.pool.x.shape[0] == 30 and fed.pool.num_examples.min() >= 16 and len(fed.test.y) == 500


def test_embedded_default_loads_offline():
  assert data.EMBEDDED_PATH.is_relative_to(Path(data.__file__).parent)
  assert data.EMBEDDED_PATH.stat().st_size < 5e6
  with np.load(data.EMBEDDED_PATH) as asset:
    assert "provenance" in asset.files and "femnist_leaf_subset.npz" in str(asset["provenance"])
  fed = data.load_federated(DataConfig())
  assert fed.num_classes == 10 and fed.input_shape == (28, 28, 1)
  assert fed.pool.x.shape[0] == 40 and fed.pool.x.shape[2:] == (28, 28, 1)
  assert fed.pool.num_examples.min() >= 16 and fed.test.x.shape[1:] == (28, 28, 1)
  assert 0.4 < np.mean(fed.pool.x[0, : fed.pool.num_examples[0]] == 0) < 1  # MNIST style


@needs_shared
def test_embedded_asset_regenerates_exactly(tmp_path):
  script = import_script("make_embedded_dataset.py")
  digest = hashlib.sha256(LEAF_FILE.read_bytes()).hexdigest()
  with np.load(LEAF_FILE) as leaf:
    arrays = script.build_arrays({key: leaf[key] for key in leaf.files}, digest)
  with np.load(data.EMBEDDED_PATH) as asset:
    assert sorted(asset.files) == sorted(arrays)
    for key, value in arrays.items():
      np.testing.assert_array_equal(asset[key], value)
  script.write_npz(tmp_path / "asset.npz", arrays)
  assert (tmp_path / "asset.npz").read_bytes() == data.EMBEDDED_PATH.read_bytes()


def test_subsample():
  dataset = _random_dataset(n=50)
  sub = data.subsample(dataset, 20, seed=3)
  assert len(sub.y) == 20 and sub.x.shape == (20, 4, 4, 1)
  np.testing.assert_array_equal(sub.y, data.subsample(dataset, 20, seed=3).y)
  assert data.subsample(dataset, 80) is dataset


# ----------------------------------------------------------------------------------------------------------
# tfds, through tfds' own mock (MockPolicy.USE_CODE needs no metadata files and no TensorFlow).
# ----------------------------------------------------------------------------------------------------------


def _mock_tfds(num_examples=12):
  return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)


def test_tfds_emnist_is_transposed_upright(tmp_path):
  with _mock_tfds():
    splits = data.load_tfds("emnist/byclass", str(tmp_path))
    raw = tfds.data_source("emnist/byclass", split="train")
    np.testing.assert_array_equal(splits.train.x[3], raw[3]["image"].transpose(1, 0, 2))
    np.testing.assert_array_equal(splits.train.y, [raw[i]["label"] for i in range(12)])
  assert splits.train.x.shape == (12, 28, 28, 1) and splits.train.num_classes == 62
  assert splits.train.groups is None and len(splits.test.y) == 12


def test_tfds_federated_cifar10_and_digits(tmp_path):
  with _mock_tfds(num_examples=40):
    cifar = data.load_federated(
      DataConfig(
        dataset="cifar10",
        source="tfds",
        path=str(tmp_path),
        partition="iid",
        num_clients=4,
        min_examples_per_client=1,
      )
    )
    digits = data.load_federated(
      DataConfig(
        dataset="emnist",
        source="tfds",
        partition="dirichlet",
        digits_only=True,
        num_clients=2,
        min_examples_per_client=1,
      )
    )
  assert cifar.pool.x.shape == (4, 10, 32, 32, 3) and cifar.num_classes == 10
  assert cifar.input_shape == (32, 32, 3) and cifar.test.x.shape == (40, 32, 32, 3)
  assert digits.num_classes == 10 and digits.pool.num_examples.sum() == 40


def test_tfds_errors(tmp_path):
  with pytest.raises(ConfigError, match="not available under data_dir.*tfds build emnist/digits"):
    data.load_tfds("emnist/digits", str(tmp_path))
  with pytest.raises(ConfigError, match="writer ids"):
    data.load_federated(DataConfig(dataset="emnist", source="tfds", partition="writer"))


# ----------------------------------------------------------------------------------------------------------
# Partitions.
# ----------------------------------------------------------------------------------------------------------

PARTITIONERS = {
  "dirichlet": lambda seed: data.partition_dirichlet(_random_dataset(n=300).y, 6, 0.5, 5, seed),
  "iid": lambda seed: data.partition_iid(300, 7, 10, seed),
}


@pytest.mark.parametrize("name", PARTITIONERS)
def test_partition_covers_once_and_is_seeded(name):
  clients = PARTITIONERS[name](0)
  _assert_covers_once(clients, 300)
  assert min(map(len, clients)) >= 5
  assert all(np.all(np.diff(client) > 0) for client in clients)
  for a, b in zip(clients, PARTITIONERS[name](0)):
    np.testing.assert_array_equal(a, b)
  assert any(len(a) != len(b) or np.any(a != b) for a, b in zip(clients, PARTITIONERS[name](1)))


def test_dirichlet_alpha_controls_label_skew():
  labels = _random_dataset(n=2000, num_classes=10).y

  def top_class_share(alpha):
    clients = data.partition_dirichlet(labels, 10, alpha, seed=0)
    return np.mean([np.bincount(labels[c]).max() / len(c) for c in clients])

  assert top_class_share(0.05) > 0.6 > 0.2 > top_class_share(100.0)


def test_writer_partition_keeps_writers_intact():
  groups = np.repeat(np.arange(12), np.arange(1, 13))  # writer w has w + 1 examples
  clients = data.partition_by_group(groups, num_clients=5, min_examples=4, seed=0)
  assert len(clients) == 5
  for client in clients:
    writer = groups[client[0]]
    assert np.all(groups[client] == writer)
    np.testing.assert_array_equal(client, np.flatnonzero(groups == writer))
    assert len(client) >= 4
  writers = [groups[c[0]] for c in clients]
  assert writers == sorted(writers)
  assert writers == [groups[c[0]] for c in data.partition_by_group(groups, 5, 4, seed=0)]
  assert writers != [groups[c[0]] for c in data.partition_by_group(groups, 5, 4, seed=1)]
  # Fewer qualifying writers than num_clients: all of them.
  assert len(data.partition_by_group(groups, num_clients=100, min_examples=4)) == 9


def test_partition_errors():
  with pytest.raises(ConfigError, match="dirichlet_alpha=0.001"):
    data.partition_dirichlet(_random_dataset(n=100).y, 20, 0.001, min_examples=4)
  with pytest.raises(ConfigError, match="num_clients=20 x min_examples=10"):
    data.partition_iid(100, 20, 10)
  with pytest.raises(ConfigError, match="min_examples=50"):
    data.partition_by_group(np.repeat(np.arange(3), 10), 2, 50)
  with pytest.raises(ConfigError, match="alpha=-1"):
    data.partition_dirichlet(np.zeros(10, int), 2, -1.0)


# ----------------------------------------------------------------------------------------------------------
# Packing.
# ----------------------------------------------------------------------------------------------------------


def test_pack_clients_layout_and_padding():
  dataset = _random_dataset(n=20)
  clients = [np.array([0, 1]), np.array([2, 3, 4, 5, 6]), np.array([7]), np.array([8, 9, 10, 11, 12])]
  pool = data.pack_clients(dataset, clients)
  order = [1, 3, 0, 2]  # size descending, ties in input order
  np.testing.assert_array_equal(pool.num_examples, [5, 5, 2, 1])
  assert pool.x.shape == (4, 5, 4, 4, 1) and pool.y.shape == (4, 5)
  assert pool.num_examples.dtype == np.int32 and pool.y.dtype == np.int32 and pool.x.dtype == np.uint8
  mask = np.arange(5) < pool.num_examples[:, None]
  for row, k in enumerate(order):
    n = len(clients[k])
    np.testing.assert_array_equal(pool.x[row, :n], dataset.x[clients[k]])
    np.testing.assert_array_equal(pool.y[row, :n], dataset.y[clients[k]])
  assert not pool.x[~mask].any() and not pool.y[~mask].any()
  assert data.padding_efficiency(pool) == pytest.approx(13 / 20)


def test_pack_clients_truncates_to_capacity():
  dataset = _random_dataset(n=30)
  clients = [np.arange(0, 20), np.arange(20, 23)]
  pool = data.pack_clients(dataset, clients, capacity=8, seed=1)
  np.testing.assert_array_equal(pool.num_examples, [8, 3])
  kept = [i for i in range(20) if any(np.array_equal(dataset.x[i], img) for img in pool.x[0])]
  assert len(kept) == 8
  np.testing.assert_array_equal(pool.x, data.pack_clients(dataset, clients, capacity=8, seed=1).x)
  assert np.any(pool.x != data.pack_clients(dataset, clients, capacity=8, seed=2).x)


def test_pack_clients_errors():
  dataset = _random_dataset(n=10)
  with pytest.raises(ConfigError, match="client 1 has indices"):
    data.pack_clients(dataset, [np.array([0, 1]), np.array([], int)])
  with pytest.raises(ConfigError, match="client 0 holds index 10"):
    data.pack_clients(dataset, [np.array([0, 10])])
  with pytest.raises(ConfigError, match="capacity=0"):
    data.pack_clients(dataset, [np.array([0, 1])], capacity=0)
  with pytest.raises(ConfigError, match="client_indices is empty"):
    data.pack_clients(dataset, [])


# ----------------------------------------------------------------------------------------------------------
# Errors: bad files, bad arrays, bad config values.
# ----------------------------------------------------------------------------------------------------------


def test_missing_and_corrupt_files(tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    data.load_npz(tmp_path / "nope.npz")
  random_bytes = tmp_path / "random.npz"
  random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(ConfigError, match="not a readable .npz archive"):
    data.load_npz(random_bytes)
  good = _save(tmp_path, _project_arrays())
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
  with pytest.raises(ConfigError, match="not a readable .npz archive"):
    data.load_npz(truncated)
  np.save(tmp_path / "single.npy", np.zeros(3))
  with pytest.raises(ConfigError, match="single .npy array"):
    data.load_npz(tmp_path / "single.npy")
  with pytest.raises(ConfigError, match="cifar10_train_batch1.npz.*does not exist"):
    data.load_npz(tmp_path)


def test_missing_keys_and_unknown_layout(tmp_path):
  arrays = _project_arrays()
  del arrays["test_label"]
  with pytest.raises(ConfigError, match=r"lacks keys \['test_label'\]"):
    data.load_npz(_save(tmp_path, arrays))
  with pytest.raises(ConfigError, match=r"has keys \['a', 'b'\]: expected the project layout"):
    data.load_npz(_save(tmp_path, {"a": np.zeros(2), "b": np.zeros(2)}, "other.npz"))
  with pytest.raises(ConfigError, match=r"lacks keys \['leaf_split'\]"):
    data.load_npz(
      _save(
        tmp_path,
        {"x": np.zeros((2, 28, 28), np.uint8), "y": np.zeros(2, int), "writer": np.zeros(2, int)},
        "leaf.npz",
      )
    )


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("train_image", np.zeros((30, 28, 28, 1), np.float32), "dtype float32: expected uint8"),
    ("train_image", np.zeros((30, 784), np.uint8), r"shape \(30, 784\): expected \[n >= 1, H, W, C\]"),
    ("train_label", np.full(30, np.nan), "dtype float64: expected integers"),
    ("train_label", np.arange(30), r"labels\[10\]=10 is out of range: expected 0 <= value < 10"),
    ("train_label", np.zeros(29, int), r"shape \(29,\): expected \[30\]"),
    ("test_writer", -np.ones(10, int), r"writer ids\[0\]=-1 is out of range"),
    ("num_classes", np.array(2.5), "num_classes=array"),
  ],
)
def test_bad_arrays(tmp_path, key, value, message):
  arrays = _project_arrays()
  arrays[key] = value
  with pytest.raises(ConfigError, match=message):
    data.load_npz(_save(tmp_path, arrays))


def test_image_shape_must_match_dataset(tmp_path):
  path = _save(tmp_path, _project_arrays(shape=(32, 32, 3)))
  with pytest.raises(ConfigError, match=r"expected \[n, 28, 28, 1\] for dataset='femnist'"):
    data.load_splits(DataConfig(source="npz", path=str(path), partition="iid"))
  assert data.load_splits(
    DataConfig(dataset="cifar10", source="npz", path=str(path), partition="iid")
  ).train.x.shape == (30, 32, 32, 3)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(capacity=-1), "capacity=-1"),
    (dict(test_examples=1.5), "test_examples=1.5"),
    (dict(digits_only="yes"), "digits_only='yes'"),
    (dict(digits_only=True, dataset="cifar10", partition="iid"), "digits_only=True is invalid"),
    (dict(num_clients=1), "num_clients=1"),
    (dict(dirichlet_alpha=0.0), "dirichlet_alpha=0.0"),
  ],
)
def test_bad_config_values(kwargs, message):
  with pytest.raises(ConfigError, match=message):
    DataConfig(**kwargs)


def test_embedded_has_no_cifar10():
  with pytest.raises(ConfigError, match="source='embedded' holds FEMNIST digits only"):
    data.load_federated(DataConfig(dataset="cifar10", partition="iid"))


def test_load_federated_capacity_and_test_subsample():
  fed = data.load_federated(DataConfig(capacity=50, test_examples=100, seed=2))
  assert fed.pool.x.shape[:2] == (40, 50) and fed.pool.num_examples.max() == 50
  assert len(fed.test.y) == 100
  again = data.load_federated(DataConfig(capacity=50, test_examples=100, seed=2))
  np.testing.assert_array_equal(fed.pool.x, again.pool.x)
  np.testing.assert_array_equal(fed.test.y, again.test.y)


# ----------------------------------------------------------------------------------------------------------
# Bounded loading: tiny files must not make the loader allocate gigabytes (issue 12 reproducers).
# ----------------------------------------------------------------------------------------------------------


def _npy_member(archive: zipfile.ZipFile, key: str, shape: tuple, dtype: str, data: bytes = b"", repeat=0):
  """Writes ``key.npy`` with a header declaring ``shape``/``dtype``, then ``data`` and ``repeat`` MiB of
  zeros (streamed, so a large member never exists in memory)."""
  with archive.open(f"{key}.npy", "w", force_zip64=True) as f:
    np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
    f.write(data)
    for _ in range(repeat):
      f.write(bytes(1 << 20))


def _bounded_loading_files(tmp_path: Path) -> dict[str, Path]:
  arrays = _project_arrays(n_train=24, n_test=8)
  files = {}
  files["huge_writer_ids"] = _save(
    tmp_path, dict(arrays, train_writer=np.array([0, 2**31 - 2] * 12, np.int32)), "ids.npz"
  )
  files["huge_num_classes"] = _save(tmp_path, dict(arrays, num_classes=np.array(2**31 - 1)), "classes.npz")
  files["unused_key"] = tmp_path / "unused.npz"
  with zipfile.ZipFile(files["unused_key"], "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
    for key, value in arrays.items():
      with archive.open(f"{key}.npy", "w") as f:
        np.lib.format.write_array(f, value)
    _npy_member(archive, "unused", (300 << 20,), "|u1", repeat=300)
  files["one_tib_key"] = tmp_path / "tib.npz"
  with zipfile.ZipFile(files["one_tib_key"], "w") as archive:
    for key, value in arrays.items():
      if key != "train_image":
        with archive.open(f"{key}.npy", "w") as f:
          np.lib.format.write_array(f, value)
    _npy_member(archive, "train_image", (2**40 // 784, 28, 28, 1), "|u1", data=bytes(100))
  leaf = {
    "x": np.zeros((20, 28, 28), np.uint8),
    "y": np.arange(20) % 10,
    "writer": np.repeat(np.array([3, 2**31 - 2]), 10),
    "leaf_split": np.tile([0, 0, 0, 1, 1], 4).astype(np.uint8),
  }
  files["leaf_huge_writer_ids"] = _save(tmp_path, leaf, "leaf.npz")
  return files


_MEMORY_PROBE = """
import json, resource, sys
from fcfn_jax import config, data, validate

def peak():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

start, results = peak(), {}
for name, path in json.loads(sys.argv[1]).items():
  cfg = config.DataConfig(source="npz", path=path, num_clients=2, min_examples_per_client=1)
  try:
    fed = data.load_federated(cfg)
    results[name] = ["ok", fed.pool.x.shape[0]]
  except validate.ConfigError as err:
    results[name] = ["error", str(err)]
print(json.dumps({"grew": peak() - start, "results": results}))
"""


def test_tiny_npz_files_load_in_bounded_memory(tmp_path):
  """Writer ids near 2^31, num_classes 2^31 - 1, an unused 300 MiB key, a key declaring 1 TiB: each loads
  or fails with one clear line, and the loading process's peak memory grows by far less than any of them."""
  files = _bounded_loading_files(tmp_path)
  assert max(path.stat().st_size for path in files.values()) < 2_000_000
  proc = subprocess.run(
    [sys.executable, "-c", _MEMORY_PROBE, json.dumps({k: str(v) for k, v in files.items()})],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  results = report["results"]
  assert results["huge_writer_ids"] == ["ok", 2]
  assert results["unused_key"][0] == "ok"
  assert results["leaf_huge_writer_ids"] == ["ok", 2]
  assert results["huge_num_classes"][0] == "error"
  assert (
    "num_classes=2147483647 is invalid: expected an integer in [2, 65536]" in results["huge_num_classes"][1]
  )
  assert results["one_tib_key"][0] == "error"
  assert "has train_image declaring shape (1402438300, 28, 28, 1) uint8 (1 TiB)" in results["one_tib_key"][1]
  assert report["grew"] < 150 << 20, report  # the unused key alone is 300 MiB


def test_declared_sizes_are_checked_against_the_memory_limit(tmp_path, monkeypatch):
  path = _save(tmp_path, _project_arrays(n_train=30))
  monkeypatch.setattr(data, "memory_limit", lambda: 20_000)
  with pytest.raises(
    ConfigError,
    match=r"its arrays train_image \(30, 28, 28, 1\) uint8.* would take 31.3 KiB: expected at most 19.5 KiB",
  ):
    data.load_npz(path)
  monkeypatch.setattr(data, "memory_limit", lambda: 40_000)
  with pytest.raises(
    ConfigError, match=r"the client pool \(5 clients x \d+ examples .* expected at most 39.1 KiB"
  ):
    data.load_federated(
      DataConfig(source="npz", path=str(path), num_clients=5, min_examples_per_client=1, capacity=20)
    )


def test_object_arrays_and_single_npy_files_are_refused(tmp_path):
  arrays = dict(_project_arrays(), train_label=np.array([None] * 30, dtype=object))
  path = tmp_path / "object.npz"
  np.savez(path, **{k: v for k, v in arrays.items() if k != "train_label"})
  with zipfile.ZipFile(path, "a") as archive, archive.open("train_label.npy", "w") as f:
    np.lib.format.write_array(f, arrays["train_label"], allow_pickle=True)
  with pytest.raises(ConfigError, match=r"has train_label of dtype object: expected numbers"):
    data.load_npz(path)
  np.save(tmp_path / "single.npy", np.zeros(3))
  with pytest.raises(ConfigError, match="holds a single .npy array: expected an .npz archive"):
    data.load_npz(tmp_path / "single.npy")


def test_more_clients_than_the_data_has_is_an_error_naming_the_real_count():
  with pytest.raises(ConfigError, match=r"num_clients=100000 is invalid: source='embedded' has 285 writers"):
    data.load_federated(DataConfig(num_clients=100_000))


def test_tfds_without_a_prepared_dataset_is_a_config_error(tmp_path, monkeypatch):
  """--source=tfds without --data_path: tfds' default data_dir has no prepared split (was a KeyError)."""
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(ConfigError, match=r"tfds dataset 'cifar10' is not available under data_dir=None"):
    data.load_federated(DataConfig(dataset="cifar10", source="tfds", partition="iid"))
