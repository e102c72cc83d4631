"""Regenerates ``fcfn_jax/assets/femnist_digits.npz``, the package's embedded default dataset.

Selection (no randomness, so the arrays are reproduced exactly): from the shared LEAF FEMNIST subset keep
the digits (labels 0-9) of every writer that has its LEAF train part; LEAF's own per-writer split gives
train / test. Pixels are inverted to MNIST style (0 = background) and get a channel axis. Writers are
renumbered 0..W-1 in the order of the source's writer index. The zip entries carry a fixed timestamp, so
the file bytes are reproducible too.

The source is checked before anything is built (readable .npz, the LEAF keys, uint8 28x28 images, labels
in [0, 62), writer indices into ``writers``, a 0/1 split) and the output written atomically (a temporary
file renamed over it), so a bad input or a kill mid-write leaves the existing asset untouched.

  python scripts/make_embedded_dataset.py \
      --source=../shared/data/femnist_leaf_subset.npz --output=fcfn_jax/assets/femnist_digits.npz
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from absl import flags

from fcfn_jax import data, report, validate

_REPO = Path(__file__).resolve().parents[1]

_SOURCE = flags.DEFINE_string(
  "source",
  str(_REPO.parent / "shared" / "data" / "femnist_leaf_subset.npz"),
  "The shared LEAF FEMNIST subset (keys x, y, writer, writers, leaf_split).",
)
_OUTPUT = flags.DEFINE_string(
  "output", str(_REPO / "fcfn_jax" / "assets" / "femnist_digits.npz"), "Where to write the asset (.npz)."
)

_NUM_DIGITS = 10
_LEAF_CLASSES = 62
_KEYS = ("x", "y", "writer", "writers", "leaf_split")


def read_source(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The LEAF arrays at ``path``, checked; ConfigError naming the file and the bad array."""
  name = f"source={str(path)!r}"
  validate.require(os.path.isfile(path), f"{name} is not a file: expected the shared LEAF FEMNIST .npz")
  leaf = data.read_npz(path, _KEYS)
  x, writers = leaf["x"], leaf["writers"]
  validate.require(
    x.dtype == np.uint8 and x.ndim == 3 and x.shape[1:] == (28, 28) and len(x) > 0,
    f"{name} has x of shape {x.shape} {x.dtype}: expected uint8 [n >= 1, 28, 28]",
  )
  validate.require(
    writers.ndim == 1 and len(writers) > 0, f"{name} has writers of shape {writers.shape}: expected [W >= 1]"
  )
  for key, upper in (("y", _LEAF_CLASSES), ("writer", len(writers)), ("leaf_split", 2)):
    values = leaf[key]
    validate.require(
      values.shape == (len(x),) and np.issubdtype(values.dtype, np.integer),
      f"{name} has {key} of shape {values.shape} {values.dtype}: expected integers [{len(x)}], one per image",
    )
    validate.check_array(
      f"{name} {key}",
      values,
      lambda v, upper=upper: (v >= 0) & (v < upper),
      f"0 <= value < {upper}",
      kinds="iu",
    )
  return leaf


def build_arrays(leaf: Mapping[str, np.ndarray], source_sha256: str) -> dict[str, np.ndarray]:
  """The asset's arrays in the project npz layout (see ``fcfn_jax.data.load_npz``)."""
  y, writer, leaf_split = leaf["y"], leaf["writer"], leaf["leaf_split"]
  has_train = np.zeros(len(leaf["writers"]), bool)
  has_train[writer[leaf_split == 0]] = True
  keep = (y < _NUM_DIGITS) & has_train[writer]
  validate.require(keep.any(), "the source has no digit (label < 10) of a writer with a LEAF train part")
  kept_writers, renumbered = np.unique(writer[keep], return_inverse=True)
  new_writer = np.full(len(y), -1, np.int32)
  new_writer[keep] = renumbered
  arrays = {}
  for split, code in (("train", 0), ("test", 1)):
    rows = keep & (leaf_split == code)
    arrays[f"{split}_image"] = (255 - leaf["x"][rows])[..., None]
    arrays[f"{split}_label"] = y[rows].astype(np.int32)
    arrays[f"{split}_writer"] = new_writer[rows]
  arrays["num_classes"] = np.array(_NUM_DIGITS, np.int32)
  arrays["writers"] = leaf["writers"][kept_writers]
  arrays["provenance"] = np.array(
    "FEMNIST digits (EMNIST by writer, NIST SD19 -> EMNIST (Cohen et al., 2017) -> LEAF (Caldas et al., "
    "2018)). Built by scripts/make_embedded_dataset.py from ../shared/data/femnist_leaf_subset.npz "
    f"(sha256 {source_sha256}): labels 0-9 of the writers that have their LEAF train part "
    f"({len(kept_writers)} with digits), LEAF's per-writer train/test split, pixels inverted to MNIST "
    f"style (0 = background), writers renumbered 0..{len(kept_writers) - 1} (LEAF ids in 'writers'). "
    f"{len(arrays['train_label'])} train and {len(arrays['test_label'])} test images, 28x28x1 uint8. "
    "NIST SD19 is a U.S. government database made available for research; LEAF is BSD-2."
  )
  return arrays


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """np.savez_compressed with a fixed entry timestamp (equal arrays give equal bytes), written atomically:
  the archive is built in memory and renamed over ``path``, so ``path`` is never partial."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    for key, value in arrays.items():
      member = io.BytesIO()
      np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)
      info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
      archive.writestr(info, member.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
  report.write_bytes_atomic(path, buffer.getvalue())


def _check_output(path: Path) -> None:
  validate.require(
    path.suffix == ".npz" and not path.is_dir(),
    f"output={str(path)!r} is invalid: expected an .npz file path",
  )
  validate.require(path.parent.is_dir(), f"output={str(path)!r} is invalid: its folder does not exist")
  validate.require(
    os.access(path.parent, os.W_OK), f"output={str(path)!r} is invalid: its folder is not writable"
  )


def main(argv: list[str]) -> None:
  del argv
  source, output = Path(_SOURCE.value), Path(_OUTPUT.value)
  _check_output(output)
  leaf = read_source(source)
  digest = hashlib.sha256(source.read_bytes()).hexdigest()
  arrays = build_arrays(leaf, digest)
  with validate.reraise(OSError, lambda e: f"output={str(output)!r} could not be written ({e.strerror})"):
    write_npz(output, arrays)
  written = hashlib.sha256(output.read_bytes()).hexdigest()
  print(f"wrote {output} ({output.stat().st_size} bytes, sha256 {written})")


if __name__ == "__main__":
  import sim_flags  # scripts/ is on the path when this file runs as a script

  sim_flags.run(main)
