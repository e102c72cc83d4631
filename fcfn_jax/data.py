"""Data: tfds / .npz / embedded loading, client partitioning and padded client pools (docs/model.md "Data").

``load_federated`` joins the steps the simulation needs: load a train and a test split as uint8 images
(MNIST style for EMNIST: 0 = background), split the train split into clients (by writer, Dirichlet label
skew or IID) and pack the clients into one padded ``ClientPool`` that the federated round indexes inside
``jit``. Everything here is host-side numpy; randomness comes from ``np.random.default_rng(seed)``, so
equal seeds give equal outputs.
"""

from __future__ import annotations

import math
import os
import tokenize
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

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
MAX_CLASSES = 2**16  # far above EMNIST's 62 or CIFAR-100; the model's output layer grows with it


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
  check_int(f"{name} num_classes", num_classes, minimum=2, maximum=MAX_CLASSES)
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


# Corruption surfaces in many types: a damaged .npy header fails numpy's parser (SyntaxError,
# tokenize.TokenError); damaged zip flags claim an unsupported compression (NotImplementedError) or
# encryption (RuntimeError).
_NPZ_ERRORS = (
  OSError,
  ValueError,
  EOFError,
  SyntaxError,
  tokenize.TokenError,
  NotImplementedError,
  RuntimeError,
  zipfile.BadZipFile,
  zlib.error,
)


def memory_limit() -> int:
  """Bytes one load may allocate: half of this machine's physical memory."""
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def _bytes(n: int) -> str:
  """n bytes in readable binary units, e.g. '1.5 GiB'."""
  power = 0
  while n >= 1000 * 1024**power and power < 5:  # 1000, not 1024: no '1.02e+03 GiB'
    power += 1
  return f"{n} B" if power == 0 else f"{n / 1024**power:.3g} {'KMGTP'[power - 1]}iB"


def _check_memory(what: str, nbytes: int) -> None:
  """ConfigError unless allocating ``nbytes`` for ``what`` stays within :func:`memory_limit`."""
  limit = memory_limit()
  require(
    nbytes <= limit,
    f"{what} would take {_bytes(nbytes)}: expected at most {_bytes(limit)} (half of this machine's memory)",
  )


class _Member(NamedTuple):
  """One array of an .npz archive as its .npy header declares it."""

  shape: tuple[int, ...]
  dtype: np.dtype
  info: zipfile.ZipInfo

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


class _Npz:
  """An .npz archive read lazily: member names on opening, each needed array's .npy header checked
  (dtype, declared size against the archive and the memory limit) before its data is allocated."""

  def __init__(self, path: Path):
    require(
      path.is_file(),
      f"path={str(path)!r} does not exist: expected an .npz file, or a directory "
      f"holding {' and '.join(CIFAR10_FILES)}",
    )
    self.path = path
    with path.open("rb") as file:
      single = file.read(6) == b"\x93NUMPY"
    require(not single, f"path={str(path)!r} holds a single .npy array: expected an .npz archive")
    with self._errors():
      self._zip = zipfile.ZipFile(path)
    self._members = {
      info.filename[: -len(".npy")]: info for info in self._zip.infolist() if info.filename.endswith(".npy")
    }

  def __enter__(self) -> _Npz:
    return self

  def __exit__(self, *exc_info) -> None:
    self._zip.close()

  def _errors(self):
    return reraise(
      _NPZ_ERRORS,
      lambda e: f"path={str(self.path)!r} is not a readable .npz archive ({type(e).__name__}: {e})",
    )

  @property
  def keys(self) -> list[str]:
    return sorted(self._members)

  def member(self, key: str) -> _Member:
    """The declared shape and dtype of ``key``; ConfigError for object arrays or a truncated member."""
    info = self._members[key]
    with self._errors(), self._zip.open(info) as stream:
      version = np.lib.format.read_magic(stream)
      read_header = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
      }.get(version)
      require(
        read_header is not None,
        f"path={str(self.path)!r} has {key} in .npy format {version}: expected format 1.0 or 2.0",
      )
      shape, _, dtype = read_header(stream)
      header_end = stream.tell()
    require(
      not dtype.hasobject and dtype.itemsize > 0,
      f"path={str(self.path)!r} has {key} of dtype {dtype}: expected numbers (object arrays need pickle)",
    )
    member = _Member(tuple(int(n) for n in shape), dtype, info)
    require(
      info.file_size >= header_end + member.nbytes,
      f"path={str(self.path)!r} has {key} declaring shape {member.shape} {dtype} ({_bytes(member.nbytes)}) "
      f"but holding {_bytes(max(0, info.file_size - header_end))}: expected a complete array",
    )
    return member

  def read(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (present ones only), after checking their total size against memory_limit()."""
    members = {key: self.member(key) for key in keys if key in self._members}
    listing = ", ".join(f"{k} {m.shape} {m.dtype}" for k, m in members.items())
    _check_memory(f"path={str(self.path)!r}: its arrays {listing}", sum(m.nbytes for m in members.values()))
    arrays = {}
    for key, member in members.items():
      with self._errors(), self._zip.open(member.info) as stream:
        arrays[key] = np.lib.format.read_array(stream, allow_pickle=False)
    return arrays


def read_npz(path: str | os.PathLike, keys: Sequence[str]) -> dict[str, np.ndarray]:
  """The arrays ``keys`` of the .npz archive at ``path``, read with :func:`load_npz`'s checks (only these
  keys, headers and sizes checked before allocating).

  Raises:
    ConfigError: a missing or corrupt file, a missing key, an object array, a truncated member, or arrays
      beyond :func:`memory_limit`.
  """
  path = Path(path)
  with _Npz(path) as npz:
    missing = [key for key in keys if key not in npz.keys]
    require(not missing, f"path={str(path)!r} lacks keys {missing} (has {npz.keys}): expected {list(keys)}")
    return npz.read(keys)


def _require_keys(path: Path, present: Sequence[str], keys: Sequence[str]) -> None:
  missing = [key for key in keys if key not in present]
  require(
    not missing, f"path={str(path)!r} lacks keys {missing} (has {sorted(present)}): expected {_LAYOUTS}"
  )


def _leaf_test_mask(
  writer: np.ndarray, leaf_split: np.ndarray, test_fraction: float, seed: int
) -> np.ndarray:
  """bool [n], True = test, for the LEAF layout.

  LEAF's own split where the writer has a LEAF train part; otherwise a seeded per-writer split that sends
  round(test_fraction * n_w) of writer w's n_w samples to test.
  """
  n = len(writer)
  # Dense 0..W-1 ids, so the per-writer counts below take O(W) memory whatever the ids' values.
  writer = np.unique(writer, return_inverse=True)[1].reshape(-1)
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

  Only the layout's keys are read (other keys cost nothing), each after its .npy header's shape and dtype
  are checked: no object arrays, no member shorter than its declared size, and all needed arrays within
  :func:`memory_limit` before any is allocated. Writer ids may be any non-negative int32 values (they are
  compacted where counted); num_classes is at most ``MAX_CLASSES``.

  Raises:
    ConfigError: a missing path, a corrupt archive, an unknown layout, missing keys, bad arrays, or
      arrays too large for this machine.
  """
  check_open_unit("test_fraction", test_fraction)
  path = Path(path)
  if path.is_dir():
    splits = []
    for file in CIFAR10_FILES:
      with _Npz(path / file) as npz:
        _require_keys(path / file, npz.keys, ("x", "y"))
        arrays = npz.read(("x", "y"))
      splits.append(make_dataset(arrays["x"], arrays["y"], _CIFAR10_NUM_CLASSES, name=str(path / file)))
    return Splits(*splits)
  with _Npz(path) as npz:
    if "train_image" in npz.keys:
      _require_keys(path, npz.keys, _PROJECT_KEYS)
      arrays = npz.read(_PROJECT_KEYS + ("train_writer", "test_writer"))
    else:
      require("x" in npz.keys, f"path={str(path)!r} has keys {npz.keys}: expected {_LAYOUTS}")
      _require_keys(path, npz.keys, _LEAF_KEYS)
      arrays = npz.read(_LEAF_KEYS)
  if "train_image" in arrays:
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
  import tensorflow_datasets as tfds  # here, not at the top: importing tfds costs every run a second or two

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

  # KeyError: tfds finds the builder but no prepared split under data_dir.
  with reraise((NotImplementedError, ValueError, FileNotFoundError, AssertionError, KeyError), unavailable):
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
  # Dense 0..W-1 ids in the order of the writer ids, so the counts take O(W) memory whatever the ids.
  groups = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
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

  Raises:
    ConfigError: the data cannot be read, has fewer writers with enough examples than cfg.num_clients,
      or the pool would not fit in :func:`memory_limit`.
  """
  require(not (cfg.source == "tfds" and cfg.partition == "writer"), _NO_WRITERS)
  splits = load_splits(cfg)
  clients = partition_clients(splits.train, cfg)
  require(
    len(clients) == cfg.num_clients,
    f"num_clients={cfg.num_clients} is invalid: source={cfg.source!r} has {len(clients)} writers with "
    f">= {cfg.min_examples_per_client} examples (min_examples_per_client); expected num_clients <= "
    f"{len(clients)}",
  )
  capacity = cfg.capacity or max(len(c) for c in clients)
  _check_memory(
    f"the client pool ({len(clients)} clients x {capacity} examples of shape {splits.train.x.shape[1:]})",
    len(clients) * capacity * (splits.train.x[0].nbytes + 4),
  )
  pool = pack_clients(splits.train, clients, capacity, cfg.seed)
  test = subsample(splits.test, cfg.test_examples, cfg.seed) if cfg.test_examples else splits.test
  return FederatedData(pool, test, splits.train.num_classes, IMAGE_SHAPES[cfg.dataset])
