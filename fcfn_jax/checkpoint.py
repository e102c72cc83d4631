"""Atomic orbax checkpoints of a simulation state pytree plus a small JSON metadata dict.

Each step is one orbax directory ``<directory>/<step>`` holding two items: ``state`` (any pytree of jax /
numpy arrays and Python scalars: model params, optax state, round counter, raw uint32 or typed PRNG keys,
per-client privacy spent, mechanism state) and ``metadata`` (JSON: config, round, history rows, so a
resumed run continues its history).

Atomicity is orbax's: a step is written into ``<step>.orbax-checkpoint-tmp*`` and renamed to ``<step>``
only once every file has landed, so a crash mid-save leaves the previous steps intact and no partial step
visible; leftover temporary directories are removed when the next :class:`Checkpointer` opens the
directory. Saves are synchronous: when :meth:`Checkpointer.save` returns, the step is committed.

Which rounds to save (every K, the last one) is the caller's decision; orbax keeps the newest
``max_to_keep`` steps.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from fcfn_jax.validate import ConfigError, check_int, require, reraise

_STATE = "state"
_METADATA = "metadata"
_MAX_LISTED = 5  # mismatching leaves named in a template error
_MAX_ERROR_CHARS = 300  # tensorstore errors embed whole specs; the full one stays chained

logger = logging.getLogger(__name__)


class Restored(NamedTuple):
  """A restored step: ``step``, ``state`` (in the template's pytree structure) and ``metadata``."""

  step: int
  state: Any
  metadata: dict[str, Any]


class _UnreadableStep(ConfigError):
  """A committed step whose files cannot be read (corrupt or partial)."""


def _leaf_spec(leaf: Any) -> tuple[tuple[int, ...], str] | None:
  """(shape, dtype) of an array leaf as orbax stores it (typed keys as their uint32 key data)."""
  if not hasattr(leaf, "dtype"):
    return None  # Python scalars: orbax stores them as scalars and restores them as such
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.eval_shape(jax.random.key_data, leaf)
  return tuple(leaf.shape), str(leaf.dtype)


def _check_template(path: str, stored: Any, template: Any) -> None:
  """Raises ConfigError unless ``template`` has the stored leaves' names, shapes and dtypes.

  Orbax checks names and shapes itself but silently casts dtypes; checking here also tells a template
  error apart from a damaged step.
  """
  want = {k: _leaf_spec(v) for k, v in ocp.tree.to_flat_dict(template, sep="/").items()}
  have = {k: _leaf_spec(v) for k, v in ocp.tree.to_flat_dict(stored, sep="/").items()}
  problems = [f"{k}: not in the checkpoint" for k in want.keys() - have.keys()]
  problems += [f"{k}: not in the template" for k in have.keys() - want.keys()]
  problems += [
    f"{k}: checkpoint {have[k]} vs template {want[k]}"
    for k in want.keys() & have.keys()
    if want[k] and have[k] and want[k] != have[k]
  ]
  require(
    not problems,
    f"template does not match checkpoint {path} ({len(problems)} leaves differ; (shape, dtype) "
    "shown): " + "; ".join(sorted(problems)[:_MAX_LISTED]),
  )


class Checkpointer:
  """Saves and restores ``(step, state, metadata)`` in ``directory``; a context manager that closes.

  Usage::

    with Checkpointer(directory, max_to_keep=3) as ckpt:
      restored = ckpt.restore(template)        # None on a fresh directory
      ...
      ckpt.save(round_, state, {"history": rows})
  """

  def __init__(self, directory: str | os.PathLike[str], max_to_keep: int = 3):
    check_int("max_to_keep", max_to_keep, minimum=1)
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False, cleanup_tmp_directories=True
      ),
      item_handlers={_STATE: ocp.StandardCheckpointHandler(), _METADATA: ocp.JsonCheckpointHandler()},
    )

  def all_steps(self) -> list[int]:
    """Committed steps, ascending (temporary directories of crashed saves are never listed)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or None if there is none."""
    return self._manager.latest_step()

  def step_path(self, step: int) -> str:
    """The directory of ``step``."""
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, metadata: dict[str, Any] | None = None) -> None:
    """Writes ``step`` atomically and returns once it is committed; drops steps beyond ``max_to_keep``.

    Raises:
      ConfigError: ``step`` is not an integer above the latest saved step, or ``metadata`` is not a
        JSON-serializable dict (checked before anything is written).
    """
    check_int("step", step, minimum=0)
    latest = self.latest_step()
    require(
      latest is None or step > latest,
      f"step={step} is invalid: {self.directory} already holds steps up to {latest}; expected a "
      "step > latest_step() (resume from the latest step, or use a fresh directory)",
    )
    metadata = {} if metadata is None else metadata
    require(isinstance(metadata, dict), f"metadata={metadata!r} is invalid: expected a dict")
    with reraise(
      (TypeError, ValueError), lambda e: f"metadata is invalid: expected JSON-serializable values ({e})"
    ):
      json.dumps(metadata)
    self._manager.save(
      step,
      force=True,
      args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(state), _METADATA: ocp.args.JsonSave(metadata)}
      ),
    )
    self._manager.wait_until_finished()

  def restore(self, template: Any, step: int | None = None) -> Restored | None:
    """Restores a step into the pytree structure of ``template`` (NamedTuple types come back).

    ``template`` is a state of the right structure: concrete arrays or ``jax.ShapeDtypeStruct``s (e.g.
    ``jax.eval_shape(init, key)``); leaf shapes and dtypes must match the checkpoint's.

    With ``step=None`` the newest step is restored; a step that cannot be read (corrupt or partial files)
    is skipped with a logged warning in favour of the next older one.

    Returns:
      ``Restored(step, state, metadata)``, or None when the directory holds no committed step (missing or
      empty directory, or only temporary directories of crashed saves).

    Raises:
      ConfigError: ``template`` does not match the checkpoint (names the mismatching leaves); ``step``
        does not exist or cannot be read; or every step is unreadable (names their paths).
    """
    steps = self.all_steps()
    if step is not None:
      require(
        step in steps,
        f"step={step!r} is invalid: expected one of the saved steps {steps} in {self.directory}",
      )
      return self._restore_step(step, template)
    failures = []
    for candidate in reversed(steps):
      try:
        return self._restore_step(candidate, template)
      except _UnreadableStep as e:
        logger.warning("%s; falling back to the previous step", e)
        failures.append(str(e))
    require(not failures, "no readable checkpoint: " + "; ".join(failures))
    return None

  def _restore_step(self, step: int, template: Any) -> Restored:
    path = self.step_path(step)
    try:
      _check_template(path, self._manager.item_metadata(step)[_STATE].tree, template)
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
          **{_STATE: ocp.args.StandardRestore(template), _METADATA: ocp.args.JsonRestore()}
        ),
      )
    except ConfigError:
      raise
    except Exception as e:  # orbax and tensorstore raise many types on damaged files
      summary = (str(e).strip().splitlines() or [""])[0][:_MAX_ERROR_CHARS]
      raise _UnreadableStep(f"checkpoint {path} is unreadable: {type(e).__name__}: {summary}") from e
    return Restored(step, restored[_STATE], restored[_METADATA])

  def close(self) -> None:
    """Waits for pending writes and releases orbax's resources."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
