"""Data: tfds / .npz / embedded loading, client partitioning and padded client pools (docs/model.md "Data").

``load_federated`` joins the steps the simulation needs: load a train and a test split as uint8 images
(MNIST style for EMNIST: 0 = background), split the train split into clients (by writer, Dirichlet label
skew or IID) and pack the clients into one padded ``ClientPool`` that the federated round indexes inside
``jit``. Everything here is host-side numpy; randomness comes from ``np.random.default_rng(seed)``, so
equal seeds give equal outputs.
"""

from __future__ import annotations

import os
import tokenize
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from fcfn_jax.config import DataConfig
from fcfn_jax.validate import check_int, check_open_unit, check_positive, fail, require, reraise

EMBEDDED_PATH = Path(__file__).resolve().parent / "assets" / "femnist_digits.npz"
IMAGE_SHAPES = {"femnist": (28, 28, 1), "emnist": (28, 28, 1), "cifar10": (32, 32, 3)}
CIFAR10_FILES = ("cifar10_train_batch1.npz", "cifar10_test.npz")
NUM_DIGITS = 10

_LEAF_NUM_CLASSES = 62
_CIFAR10_NUM_CLASSES = 10
_PROJECT_KEYS = ("train_image", "train_label", "test_image", "test_label", "num_classes")
_LEAF_KEYS = ("x", "y", "writer", "leaf_split")
_LAYOUTS = (
  "the project layout (train_image, train_label, test_image, test_label, num_classes; optional "
  "train_writer, test_writer), the LEAF FEMNIST layout (x, y, writer, leaf_split), or a directory "
  f"holding {' and '.join(CIFAR10_FILES)} (x, y)"
)
_NO_WRITERS = (
  "partition='writer' needs writer ids, but tfds' EMNIST and CIFAR-10 carry none: use "
  "partition='dirichlet' or 'iid', or FEMNIST from source='embedded' or 'npz'"
)
_DIRICHLET_TRIES = 100


class Dataset(NamedTuple):
  """Examples of one split.

  x: uint8 [n, H, W, C] (MNIST style for EMNIST: 0 = background); y: int32 [n];
  groups: int32 [n] natural client id (writer) or None; num_classes: number of labels.
  """

  x: np.ndarray
  y: np.ndarray
  groups: np.ndarray | None
  num_classes: int


class ClientPool(NamedTuple):
  """All clients' local data as one padded array (clients sorted by size, padding at the end).

  x: uint8 [clients, capacity, H, W, C]; y: int32 [clients, capacity];
  num_examples: int32 [clients], the number of valid (unpadded) slots of each client.
  """

  x: np.ndarray
  y: np.ndarray
  num_examples: np.ndarray


class Splits(NamedTuple):
  """The train split (partitioned into clients) and the server's test split."""

  train: Dataset
  test: Dataset


class FederatedData(NamedTuple):
  """What the simulation consumes: the clients' padded pool, the test split and the image geometry.

  input_shape: (H, W, C) of one image.
  """

  pool: ClientPool
  test: Dataset
  num_classes: int
  input_shape: tuple[int, int, int]


# ----------------------------------------------------------------------------------------------------------
# Validation and loading.
# ----------------------------------------------------------------------------------------------------------


def _one_line(values: np.ndarray) -> str:
  """A one-line description of an array for error messages: its repr if small, else shape and dtype."""
  return (
    " ".join(repr(values).split()) if values.size <= 8 else f"<{values.dtype} array of shape {values.shape}>"
  )


def _int_vector(name: str, values: Any, n: int, upper: int) -> np.ndarray:
  """values as int32 [n]; ConfigError unless integer-typed (so NaN-free) with 0 <= values < upper."""
  values = np.asarray(values)
  require(
    np.issubdtype(values.dtype, np.integer),
    f"{name} have dtype {values.dtype}: expected integers (no NaN, no floats)",
  )
  require(values.shape == (n,), f"{name} have shape {values.shape}: expected [{n}], one per image")
  bad = (values < 0) | (values >= upper)
  if bad.any():
    i = int(np.argmax(bad))
    require(False, f"{name}[{i}]={values[i]} is out of range: expected 0 <= value < {upper}")
  return values.astype(np.int32)


def make_dataset(x: Any, y: Any, num_classes: int, groups: Any = None, name: str = "data") -> Dataset:
  """A validated Dataset.

  x: uint8 [n, H, W, C], or [n, H, W] (gets C = 1); y: integers [n] in [0, num_classes);
  groups: integers [n] >= 0, or None.

  Raises:
    ConfigError naming ``name``, the bad array and what is allowed.
  """
  x = np.asarray(x)
  require(x.dtype == np.uint8, f"{name} images have dtype {x.dtype}: expected uint8 pixels in [0, 255]")
  if x.ndim == 3:
    x = x[..., None]
  require(x.ndim == 4 and len(x) > 0, f"{name} images have shape {x.shape}: expected [n >= 1, H, W, C]")
  check_int(f"{name} num_classes", num_classes, minimum=2)
  y = _int_vector(f"{name} labels", y, len(x), num_classes)
  if groups is not None:
    groups = _int_vector(f"{name} writer ids", groups, len(x), np.iinfo(np.int32).max)
  return Dataset(x, y, groups, num_classes)


def _subset(dataset: Dataset, rows: np.ndarray, what: str) -> Dataset:
  """The examples at ``rows`` (indices or a bool mask); ConfigError if none is left."""
  subset = Dataset(
    dataset.x[rows],
    dataset.y[rows],
    None if dataset.groups is None else dataset.groups[rows],
    dataset.num_classes,
  )
  require(len(subset.y) > 0, f"{what} is empty: expected at least 1 example")
  return subset


def subsample(dataset: Dataset, num: int, seed: int = 0) -> Dataset:
  """A seeded uniform subsample of ``num`` examples without replacement (in index order).

  The whole dataset when num >= its size.
  """
  check_int("num", num)
  if num >= len(dataset.y):
    return dataset
  rows = np.sort(np.random.default_rng(seed).choice(len(dataset.y), num, replace=False))
  return _subset(dataset, rows, "subsample")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
  """All arrays of an .npz archive; ConfigError if it is missing, corrupt or a single .npy array."""
  require(
    path.is_file(),
    f"path={str(path)!r} does not exist: expected an .npz file, or a directory "
    f"holding {' and '.join(CIFAR10_FILES)}",
  )
  # Corruption surfaces in many types: a damaged .npy header fails numpy's parser (SyntaxError,
  # tokenize.TokenError); damaged zip flags claim an unsupported compression (NotImplementedError) or
  # encryption (RuntimeError).
  with (
    reraise(
      (
        OSError,
        ValueError,
        EOFError,
        SyntaxError,
        tokenize.TokenError,
        NotImplementedError,
        RuntimeError,
        zipfile.BadZipFile,
        zlib.error,
      ),
      lambda error: f"path={str(path)!r} is not a readable .npz archive ({type(error).__name__}: {error})",
    ),
    path.open("rb") as file,
  ):
    archive = np.load(file, allow_pickle=False)
    arrays = dict(archive.items()) if isinstance(archive, np.lib.npyio.NpzFile) else None
  require(arrays is not None, f"path={str(path)!r} holds a single .npy array: expected an .npz archive")
  return arrays


def _require_keys(path: Path, arrays: Mapping[str, np.ndarray], keys: Sequence[str]) -> None:
  missing = [key for key in keys if key not in arrays]
  require(not missing, f"path={str(path)!r} lacks keys {missing} (has {sorted(arrays)}): expected {_LAYOUTS}")


def _leaf_test_mask(
  writer: np.ndarray, leaf_split: np.ndarray, test_fraction: float, seed: int
) -> np.ndarray:
  """bool [n], True = test, for the LEAF layout.

  LEAF's own split where the writer has a LEAF train part; otherwise a seeded per-writer split that sends
  round(test_fraction * n_w) of writer w's n_w samples to test.
  """
  n = len(writer)
  has_train = np.bincount(writer[leaf_split == 0], minlength=writer.max() + 1) > 0
  order = np.lexsort((np.random.default_rng(seed).random(n), writer))
  sorted_writer = writer[order]
  rank = np.empty(n, np.int64)
  rank[order] = np.arange(n) - np.searchsorted(sorted_writer, sorted_writer)
  fallback = rank < np.round(test_fraction * np.bincount(writer)[writer])
  return np.where(has_train[writer], leaf_split == 1, fallback)


def load_npz(path: str | os.PathLike, *, test_fraction: float = 0.2, seed: int = 0) -> Splits:
  """Train and test splits from ``.npz`` files in one of three layouts.

  - Project layout (the embedded asset uses it; MNIST style, as tfds gives): ``{split}_image`` uint8
    [n, H, W, C], ``{split}_label`` [n], optional ``{split}_writer`` [n] for split in (train, test), and
    the scalar ``num_classes``.
  - LEAF FEMNIST (``../shared/data/femnist_leaf_subset.npz``): ``x`` uint8 [n, 28, 28] with 255 = white,
    inverted to 255 - x; ``y`` in 62 classes; groups = ``writer``. Train/test follow ``leaf_split`` for
    writers with a LEAF train part; each writer with only its LEAF test part is split by seeded choice,
    round(test_fraction * n_w) of its n_w samples to test.
  - A directory with the shared CIFAR-10 copies: cifar10_train_batch1.npz (train) and cifar10_test.npz
    (test), keys ``x`` uint8 [n, 32, 32, 3] and ``y``; 10 classes, no groups.

  Raises:
    ConfigError: a missing path, a corrupt archive, an unknown layout, missing keys or bad arrays.
  """
  check_open_unit("test_fraction", test_fraction)
  path = Path(path)
  if path.is_dir():
    splits = []
    for file in CIFAR10_FILES:
      arrays = _read_npz(path / file)
      _require_keys(path / file, arrays, ("x", "y"))
      splits.append(make_dataset(arrays["x"], arrays["y"], _CIFAR10_NUM_CLASSES, name=str(path / file)))
    return Splits(*splits)
  arrays = _read_npz(path)
  if "train_image" in arrays:
    _require_keys(path, arrays, _PROJECT_KEYS)
    num_classes = arrays["num_classes"]
    require(
      num_classes.shape == () and np.issubdtype(num_classes.dtype, np.integer),
      f"path={str(path)!r} has num_classes={_one_line(num_classes)}: expected an integer scalar",
    )
    return Splits(
      *(
        make_dataset(
          arrays[f"{split}_image"],
          arrays[f"{split}_label"],
          int(num_classes),
          arrays.get(f"{split}_writer"),
          name=f"{path} {split}",
        )
        for split in ("train", "test")
      )
    )
  require("x" in arrays, f"path={str(path)!r} has keys {sorted(arrays)}: expected {_LAYOUTS}")
  _require_keys(path, arrays, _LEAF_KEYS)
  full = make_dataset(arrays["x"], arrays["y"], _LEAF_NUM_CLASSES, arrays["writer"], name=str(path))
  full = full._replace(x=255 - full.x)
  leaf_split = _int_vector(f"{path} leaf_split", arrays["leaf_split"], len(full.y), 2)
  test = _leaf_test_mask(full.groups, leaf_split, test_fraction, seed)
  return Splits(_subset(full, ~test, f"{path} train split"), _subset(full, test, f"{path} test split"))


def load_tfds(name: str, data_dir: str | None = None) -> Splits:
  """'train' and 'test' of a prepared tfds image dataset (features 'image', 'label'), without TensorFlow.

  Reads through ``tfds.data_source`` (random access over array_record files). tfds stores EMNIST
  ('emnist/byclass', 'emnist/digits', ...) transposed like the original EMNIST binaries; those images
  are transposed back to upright, as in FEMNIST/LEAF. No groups: tfds' EMNIST has no writer ids.

  Raises:
    ConfigError: ``name`` is unknown or not prepared under ``data_dir`` in a random-access format.
  """
  build = f"`tfds build {name} --file_format=array_record --data_dir=...`"
  require(
    data_dir is None or os.path.isdir(data_dir),
    f"data_dir={data_dir!r} is not a directory: expected a tfds data_dir holding {name!r} prepared "
    f"with {build}",
  )

  def unavailable(error: BaseException) -> str:
    cause = (str(error).strip().splitlines() or [""])[0]  # tfds appends lines of possible root causes
    return (
      f"tfds dataset {name!r} is not available under data_dir={data_dir!r}: tfds cannot download here; "
      f"prepare it where TensorFlow and the archives exist with {build} ({type(error).__name__}: "
      f"{cause})"
    )

  with reraise((NotImplementedError, ValueError, FileNotFoundError, AssertionError), unavailable):
    sources = tfds.data_source(name, split=["train", "test"], data_dir=data_dir, download=False)
  return Splits(*(_from_source(source, name, split) for source, split in zip(sources, ("train", "test"))))


def _from_source(source: Sequence[Mapping[str, Any]], name: str, split: str) -> Dataset:
  """A Dataset from a tfds data source, read example by example into preallocated arrays."""
  require(len(source) > 0, f"tfds dataset {name!r} split {split!r} is empty: expected at least 1 example")
  first = source[0]["image"]
  x = np.empty((len(source), *first.shape), first.dtype)
  y = np.empty(len(source), np.int64)
  for i in range(len(source)):
    example = source[i]
    x[i], y[i] = example["image"], example["label"]
  if name.startswith("emnist"):
    x = np.ascontiguousarray(x.transpose(0, 2, 1, 3))
  return make_dataset(x, y, source.dataset_info.features["label"].num_classes, name=f"tfds {name} {split}")


def load_splits(cfg: DataConfig) -> Splits:
  """The train and test splits that ``cfg`` names, checked against the dataset's image shape.

  source 'embedded': ``EMBEDDED_PATH`` (FEMNIST digits, in the package); 'npz': ``load_npz(cfg.path)``;
  'tfds': ``load_tfds`` of 'cifar10', 'emnist/digits' (digits_only) or 'emnist/byclass' with
  data_dir = cfg.path. digits_only keeps the examples with labels < 10 (10 classes).
  """
  if cfg.source == "tfds":
    name = "cifar10" if cfg.dataset == "cifar10" else "emnist/digits" if cfg.digits_only else "emnist/byclass"
    splits = load_tfds(name, cfg.path)
  elif cfg.source == "npz":
    splits = load_npz(cfg.path, test_fraction=cfg.test_fraction, seed=cfg.seed)
  else:
    require(
      cfg.dataset != "cifar10",
      "source='embedded' holds FEMNIST digits only; got dataset='cifar10': "
      "use source='npz' (path= a CIFAR-10 directory) or 'tfds'",
    )
    splits = load_npz(EMBEDDED_PATH, test_fraction=cfg.test_fraction, seed=cfg.seed)
  for split, dataset in zip(Splits._fields, splits):
    require(
      dataset.x.shape[1:] == IMAGE_SHAPES[cfg.dataset],
      f"the {split} images of source={cfg.source!r} have shape {dataset.x.shape}: expected "
      f"[n, {', '.join(map(str, IMAGE_SHAPES[cfg.dataset]))}] for dataset={cfg.dataset!r}",
    )
  if cfg.digits_only:
    splits = Splits(
      *(
        _subset(dataset, dataset.y < NUM_DIGITS, f"digits_only {split} split")._replace(
          num_classes=NUM_DIGITS
        )
        for split, dataset in zip(Splits._fields, splits)
      )
    )
  return splits


# ----------------------------------------------------------------------------------------------------------
# Partitions: each returns one sorted int64 index array per client, every client non-empty.
# ----------------------------------------------------------------------------------------------------------


def _split_by_owner(owner: np.ndarray, num_owners: int) -> list[np.ndarray]:
  """Indices i with owner[i] == k for k = 0..num_owners-1, each ascending."""
  order = np.argsort(owner, kind="stable")
  return np.split(order, np.cumsum(np.bincount(owner, minlength=num_owners))[:-1])


def partition_by_group(
  groups: np.ndarray, num_clients: int, min_examples: int = 1, seed: int = 0
) -> list[np.ndarray]:
  """Natural clients: one per writer with >= min_examples examples, writers kept intact.

  When more than ``num_clients`` writers qualify, a seeded uniform choice of num_clients of them (which
  keeps the natural spread of sizes that the game's d_i depend on); clients in writer-id order.
  """
  check_int("num_clients", num_clients)
  check_int("min_examples", min_examples)
  groups = np.asarray(groups)
  counts = np.bincount(groups)
  eligible = np.flatnonzero(counts >= min_examples)
  require(
    len(eligible) > 0,
    f"min_examples={min_examples} is too large: the largest writer has {counts.max()} examples",
  )
  if len(eligible) > num_clients:
    eligible = np.sort(np.random.default_rng(seed).choice(eligible, num_clients, replace=False))
  by_writer = _split_by_owner(groups, len(counts))
  return [by_writer[writer] for writer in eligible]


def partition_dirichlet(
  labels: np.ndarray, num_clients: int, alpha: float, min_examples: int = 1, seed: int = 0
) -> list[np.ndarray]:
  """Label-skewed clients (Hsu et al., 2019), every example in exactly one client.

  Each class's examples are shuffled and cut over the K clients in proportions p_c ~ Dirichlet(alpha 1_K);
  the whole draw is repeated until every client holds >= min_examples. Small alpha = strong skew;
  alpha -> inf tends to IID.
  """
  check_int("num_clients", num_clients)
  check_int("min_examples", min_examples)
  check_positive("alpha", alpha)
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
  owner = np.empty(len(labels), np.int64)
  for _ in range(_DIRICHLET_TRIES):
    for members in by_class:
      cuts = np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(members)
      owner[rng.permutation(members)] = np.searchsorted(cuts, np.arange(len(members)), side="right")
    if np.bincount(owner, minlength=num_clients).min() >= min_examples:
      return _split_by_owner(owner, num_clients)
  fail(
    f"dirichlet_alpha={alpha!r} with num_clients={num_clients} left a client with fewer "
    f"than min_examples={min_examples} of {len(labels)} examples in {_DIRICHLET_TRIES} "
    "draws: raise alpha or lower num_clients / min_examples"
  )


def partition_iid(
  num_examples: int, num_clients: int, min_examples: int = 1, seed: int = 0
) -> list[np.ndarray]:
  """A seeded random permutation cut into num_clients near-equal parts (sizes differ by <= 1)."""
  check_int("num_clients", num_clients)
  check_int("min_examples", min_examples)
  require(
    num_examples >= num_clients * min_examples,
    f"num_clients={num_clients} x min_examples={min_examples} is invalid: expected at most "
    f"{num_examples} examples in all",
  )
  return [
    np.sort(part)
    for part in np.array_split(np.random.default_rng(seed).permutation(num_examples), num_clients)
  ]


def partition_clients(dataset: Dataset, cfg: DataConfig) -> list[np.ndarray]:
  """The partition ``cfg.partition`` of ``dataset``'s examples into client index arrays."""
  if cfg.partition == "writer":
    require(dataset.groups is not None, _NO_WRITERS)
    return partition_by_group(dataset.groups, cfg.num_clients, cfg.min_examples_per_client, cfg.seed)
  if cfg.partition == "dirichlet":
    return partition_dirichlet(
      dataset.y, cfg.num_clients, cfg.dirichlet_alpha, cfg.min_examples_per_client, cfg.seed
    )
  return partition_iid(len(dataset.y), cfg.num_clients, cfg.min_examples_per_client, cfg.seed)


# ----------------------------------------------------------------------------------------------------------
# Packing.
# ----------------------------------------------------------------------------------------------------------


def pack_clients(
  dataset: Dataset, client_indices: Sequence[np.ndarray], capacity: int | None = None, seed: int = 0
) -> ClientPool:
  """Packs clients into x [clients, capacity, H, W, C], y [clients, capacity], num_examples [clients].

  Clients are sorted by size, largest first (stable: equal sizes keep their input order); client k's
  examples fill the first num_examples[k] slots in index order, and the rest of the row is zeros.
  capacity defaults to the largest client's size; a larger client keeps a seeded uniform subsample of
  capacity examples (without replacement).

  Raises:
    ConfigError: no clients, an empty client, an index outside the dataset, or capacity < 1.
  """
  require(len(client_indices) > 0, "client_indices is empty: expected at least 1 client")
  n = len(dataset.y)
  clients = [np.asarray(indices) for indices in client_indices]
  for k, indices in enumerate(clients):
    require(
      indices.ndim == 1 and len(indices) > 0 and np.issubdtype(indices.dtype, np.integer),
      f"client {k} has indices {_one_line(indices)}: expected a non-empty 1-D integer array",
    )
    require(
      indices.min() >= 0 and indices.max() < n,
      f"client {k} holds index {indices.min() if indices.min() < 0 else indices.max()}: expected "
      f"0 <= index < {n}",
    )
  sizes = np.array([len(indices) for indices in clients])
  capacity = int(sizes.max()) if capacity is None else capacity
  check_int("capacity", capacity)
  rng = np.random.default_rng(seed)
  rows = [
    clients[k] if sizes[k] <= capacity else np.sort(rng.choice(clients[k], capacity, replace=False))
    for k in np.argsort(-sizes, kind="stable")
  ]
  num_examples = np.array([len(row) for row in rows], np.int32)
  valid = np.arange(capacity) < num_examples[:, None]
  flat = np.concatenate(rows)
  x = np.zeros((len(rows), capacity, *dataset.x.shape[1:]), np.uint8)
  y = np.zeros((len(rows), capacity), np.int32)
  x[valid] = dataset.x[flat]
  y[valid] = dataset.y[flat]
  return ClientPool(x, y, num_examples)


def padding_efficiency(pools: ClientPool | Sequence[ClientPool]) -> float:
  """Valid slots / total slots over one pool or several (e.g. one per bucket), in (0, 1]."""
  pools = [pools] if isinstance(pools, ClientPool) else pools
  return sum(int(pool.num_examples.sum()) for pool in pools) / sum(pool.y.size for pool in pools)


def load_federated(cfg: DataConfig) -> FederatedData:
  """Loads ``cfg``'s splits, partitions the train split into clients and packs them (docs/model.md "Data").

  The pool's clients are sorted by size (``pack_clients``); capacity = cfg.capacity or the largest
  client; the test split is a seeded subsample of cfg.test_examples examples when that is > 0.
  """
  require(not (cfg.source == "tfds" and cfg.partition == "writer"), _NO_WRITERS)
  splits = load_splits(cfg)
  pool = pack_clients(splits.train, partition_clients(splits.train, cfg), cfg.capacity or None, cfg.seed)
  test = subsample(splits.test, cfg.test_examples, cfg.seed) if cfg.test_examples else splits.test
  return FederatedData(pool, test, splits.train.num_classes, IMAGE_SHAPES[cfg.dataset])
