"""Regenerates ``fcfn_jax/assets/femnist_digits.npz``, the package's embedded default dataset.

Selection (no randomness, so the arrays are reproduced exactly): from the shared LEAF FEMNIST subset keep
the digits (labels 0-9) of every writer that has its LEAF train part; LEAF's own per-writer split gives
train / test. Pixels are inverted to MNIST style (0 = background) and get a channel axis. Writers are
renumbered 0..W-1 in the order of the source's writer index. The zip entries carry a fixed timestamp, so
the file bytes are reproducible too.

  python scripts/make_embedded_dataset.py \
      --source=../shared/data/femnist_leaf_subset.npz --output=fcfn_jax/assets/femnist_digits.npz
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from absl import app, flags

_REPO = Path(__file__).resolve().parents[1]

_SOURCE = flags.DEFINE_string(
  "source",
  str(_REPO.parent / "shared" / "data" / "femnist_leaf_subset.npz"),
  "The shared LEAF FEMNIST subset (keys x, y, writer, writers, leaf_split).",
)
_OUTPUT = flags.DEFINE_string(
  "output", str(_REPO / "fcfn_jax" / "assets" / "femnist_digits.npz"), "Where to write the asset."
)

_NUM_DIGITS = 10


def build_arrays(leaf: Mapping[str, np.ndarray], source_sha256: str) -> dict[str, np.ndarray]:
  """The asset's arrays in the project npz layout (see ``fcfn_jax.data.load_npz``)."""
  y, writer, leaf_split = leaf["y"], leaf["writer"], leaf["leaf_split"]
  has_train = np.zeros(len(leaf["writers"]), bool)
  has_train[writer[leaf_split == 0]] = True
  keep = (y < _NUM_DIGITS) & has_train[writer]
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


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
  """np.savez_compressed with a fixed entry timestamp, so equal arrays give equal bytes."""
  with zipfile.ZipFile(path, "w") as archive:
    for key, value in arrays.items():
      buffer = io.BytesIO()
      np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
      info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
      archive.writestr(info, buffer.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)


def main(argv: list[str]) -> None:
  del argv
  source = Path(_SOURCE.value)
  digest = hashlib.sha256(source.read_bytes()).hexdigest()
  with np.load(source, allow_pickle=False) as leaf:
    arrays = build_arrays({key: leaf[key] for key in leaf.files}, digest)
  output = Path(_OUTPUT.value)
  write_npz(output, arrays)
  print(
    f"wrote {output} ({output.stat().st_size} bytes, sha256 "
    f"{hashlib.sha256(output.read_bytes()).hexdigest()})"
  )


if __name__ == "__main__":
  app.run(main)
