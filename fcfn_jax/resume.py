"""Resume of a simulation run: its fingerprint, and the checks a checkpoint passes before a run continues.

README "Resume, fingerprints and corrupt checkpoints": every checkpoint carries the run's fingerprint
(:func:`run_fingerprint`: every config field that can change results, the data's digest, the clients'
cost factors, the state layout version); a checkpoint with another fingerprint is refused, or moved aside
with ``restart_on_mismatch`` (:func:`check_checkpoint`), so a resumed run never mixes two configs, and its
round counter, history and privacy ledger are checked to agree before it continues
(:func:`check_resumed`). The fingerprint machinery is :mod:`fcfn_jax.fingerprint`; the checkpoints'
storage, atomicity and integrity are :mod:`fcfn_jax.checkpoint`'s.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from fcfn_jax import checkpoint, data, distributed, fingerprint
from fcfn_jax.config import SimulationConfig
from fcfn_jax.report import rename_aside
from fcfn_jax.validate import fail, require

# Bump when the meaning of simulation.SimState's leaves changes (what a round trains with, e.g. its z_i):
# older checkpoints then no longer match, and a resume refuses them naming state_layout.
STATE_LAYOUT_VERSION = 2
# Config fields that never change results (where files go; the data's digest stands for its path).
_NOT_FINGERPRINTED = ("checkpoint_dir", "checkpoint_every", "data.path")
OTHER_RUN = ".other-run"  # suffix of a checkpoint folder moved aside by restart_on_mismatch

logger = logging.getLogger(__name__)


def data_digest(fed_data: data.FederatedData) -> str:
  """SHA-256 of everything a run reads from the data: the clients' pool, the test split, the geometry."""
  pool, test = fed_data.pool, fed_data.test
  shape = np.asarray(fed_data.input_shape + (fed_data.num_classes,))
  return fingerprint.arrays_digest(pool.x, pool.y, pool.num_examples, test.x, test.y, shape)


def run_fingerprint(
  cfg: SimulationConfig, digest_of_data: str, cost_factors: np.ndarray | None = None
) -> fingerprint.Fingerprint:
  """What determines a run's results: every config field but where files go (by dotted path, so fields
  added to any config are covered), the data's digest, the clients' cost factors and the state layout.

  ``rounds`` is part of it: it changes every client's calibrated noise (T x S steps).
  """
  parts = fingerprint.config_fields(cfg, skip=_NOT_FINGERPRINTED)
  parts["data_digest"] = digest_of_data
  parts["cost_factors"] = (
    None if cost_factors is None else fingerprint.arrays_digest(np.asarray(cost_factors))
  )
  parts["state_layout"] = STATE_LAYOUT_VERSION
  return fingerprint.canonical(parts)


def check_checkpoint(
  cfg: SimulationConfig, parts: fingerprint.Fingerprint, *, restart_on_mismatch: bool = False
) -> None:
  """Makes ``cfg.checkpoint_dir`` safe to resume for the run with fingerprint ``parts``.

  Its newest good step (corrupt ones are set aside, see :mod:`fcfn_jax.checkpoint`) must carry
  ``parts``; a checkpoint of another run is refused, or with ``restart_on_mismatch`` renamed to
  ``<checkpoint_dir>.other-run`` (``-2``, ...; kept) so the run starts fresh in an empty folder.

  Raises:
    ConfigError: the checkpoint holds another run (names the differing parts) and not restart_on_mismatch.
  """
  # Several processes: process 0 inspects and renames; the others share its verdict (docs/model.md
  # "Multi-host").
  distributed.run_on_coordinator(lambda: _check_checkpoint(cfg, parts, restart_on_mismatch))


def _check_checkpoint(
  cfg: SimulationConfig, parts: fingerprint.Fingerprint, restart_on_mismatch: bool
) -> None:
  if not cfg.checkpoint_dir or not os.path.exists(cfg.checkpoint_dir):
    return
  with checkpoint.Checkpointer(cfg.checkpoint_dir) as ckpt:
    newest = ckpt.restore_metadata()
    directory = ckpt.directory
  stored = None if newest is None else newest.metadata.get("fingerprint")
  if newest is None or stored == parts:
    return
  what = fingerprint.differences(stored or {}, parts) if isinstance(stored, dict) else "no fingerprint"
  if not restart_on_mismatch:
    fail(
      f"checkpoint {directory} holds another run ({what}): expected the same settings to resume; "
      "restart_on_mismatch=True keeps it aside and starts fresh"
    )
  target = rename_aside(directory, OTHER_RUN)
  logger.warning("checkpoint %s holds another run (%s): moved to %s; starting fresh", directory, what, target)


def check_resumed(
  cfg: SimulationConfig, restored: checkpoint.Restored, history: list[dict[str, Any]]
) -> None:
  """The restored step number, round counter and history agree, and the ledger fits in the rounds run
  (at most rounds x local_steps DP-SGD steps per client).

  Raises:
    ConfigError: naming the step and what disagrees.
  """
  step, rounds = restored.step, int(restored.state.server.round)
  steps_done = np.asarray(restored.state.steps_done)
  require(
    step == rounds == len(history),
    f"checkpoint step {step} is inconsistent: round counter {rounds} and {len(history)} history rows; "
    "expected all three equal",
  )
  most = rounds * cfg.federated.local_steps
  require(
    np.all((steps_done >= 0) & (steps_done <= most)),
    f"checkpoint step {step} is inconsistent: its privacy ledger holds {int(steps_done.max())} steps for a "
    f"client after {rounds} rounds; expected at most {most}",
  )
