"""Data: tfds / .npz / embedded loading, client partitioning and padded client pools (DESIGN.md "Data")."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


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
