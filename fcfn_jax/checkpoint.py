"""Atomic, checksummed orbax checkpoints of a simulation state pytree plus a small JSON metadata dict.

Each step is one orbax directory ``<directory>/<step>`` holding two items: ``state`` (any pytree of jax /
numpy arrays and Python scalars: model params, optax state, round counter, raw uint32 or typed PRNG keys,
per-client privacy spent, mechanism state) and ``metadata`` (JSON: config, round, history rows, so a
resumed run continues its history).

Atomicity is orbax's: a step is written into ``<step>.orbax-checkpoint-tmp*`` and renamed to ``<step>``
only once every file has landed, so a crash mid-save leaves the previous steps intact and no partial step
visible; leftover temporary directories are removed when the next :class:`Checkpointer` opens the
directory. Saves are synchronous: when :meth:`Checkpointer.save` returns, the step is committed.

Integrity is ours: once orbax has committed a step, ``<step>/checksums.json`` records the SHA-256 of
every file in it (written atomically, last). A step whose files do not match it (a flipped byte, a
truncated or deleted file) or that lacks it (a save cut short between orbax's commit and the seal) is
never restored: it is set aside as ``<step>.set-aside`` (kept for inspection; orbax ignores the name) and
the next older step is tried, so the run resumes from the last good step and later saves the set-aside
step numbers again cleanly.

Which rounds to save (every K, the last one) is the caller's decision; orbax keeps the newest
``max_to_keep`` steps.

Several processes (docs/model.md "Multi-host"): every process constructs the Checkpointer and calls the
same methods in the same order, but only process 0 touches the directory; what it reads (steps, restored
state and metadata) and the ConfigErrors it raises are broadcast, so every process resumes from the same
step. This is correct because a run's state is replicated: every process holds the same server model and
privacy ledger (each round ends in the same all-reduce), so one copy is the whole state. Orbax's own
multi-process save writes each process's shards of *global* arrays; with replicated state it would only
add barriers, and its host-local arrays it refuses. One writer also means no two processes race on
orbax's temporary directories, the checksums or the set-aside renames, and the processes' file systems
need not be shared (only process 0's disk holds the checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from fcfn_jax import distributed
from fcfn_jax.report import file_sha256, rename_aside, write_json_atomic
from fcfn_jax.validate import ConfigError, check_int, require, reraise

_STATE = "state"
_METADATA = "metadata"
CHECKSUMS = "checksums.json"
SET_ASIDE = ".set-aside"  # suffix of a step directory that failed its checks
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


def _file_digests(directory: str) -> dict[str, str]:
  """SHA-256 of every file under ``directory`` (but the checksum file), by relative path."""
  digests = {}
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      relative = os.path.relpath(path, directory)
      if relative == CHECKSUMS:
        continue
      digests[relative] = file_sha256(path)
  return digests


def _summary(error: BaseException) -> str:
  """'Type: first line' of an error, cut to a readable length."""
  return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:_MAX_ERROR_CHARS]}"


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


def _host_arrays(tree: Any) -> Any:
  """Array leaves as numpy (typed PRNG keys kept): orbax refuses host-local jax arrays when several
  processes run, and process 0 writes only its own (replicated) copy."""

  def host(leaf):
    if hasattr(leaf, "dtype") and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return np.asarray(leaf)
    return leaf

  return jax.tree.map(host, tree)


class Checkpointer:
  """Saves and restores ``(step, state, metadata)`` in ``directory``; a context manager that closes.

  With several processes every process calls every method (see the module docstring): process 0 does
  the I/O and every process gets its results.

  Usage::

    with Checkpointer(directory, max_to_keep=3) as ckpt:
      restored = ckpt.restore(template)        # None on a fresh directory
      ...
      ckpt.save(round_, state, {"history": rows})
  """

  def __init__(self, directory: str | os.PathLike[str], max_to_keep: int = 3):
    check_int("max_to_keep", max_to_keep, minimum=1)
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager: ocp.CheckpointManager | None = None
    distributed.run_on_coordinator(lambda: self._open(max_to_keep))

  def _open(self, max_to_keep: int) -> None:
    require(
      not os.path.exists(self.directory) or os.path.isdir(self.directory),
      f"checkpoint directory {self.directory!r} is a file: expected a folder (or a path to create)",
    )
    # With several processes orbax would wait for all of them at its barriers: only process 0 calls it.
    multiprocessing = (
      {"multiprocessing_options": ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})}
      if distributed.is_multiprocess()
      else {}
    )
    if multiprocessing:
      os.makedirs(self.directory, exist_ok=True)  # orbax refuses create=True with active_processes
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
        create=not multiprocessing,
        **multiprocessing,
      ),
      item_handlers={_STATE: ocp.StandardCheckpointHandler(), _METADATA: ocp.JsonCheckpointHandler()},
    )

  def all_steps(self) -> list[int]:
    """Committed steps, ascending (temporary directories of crashed saves are never listed)."""
    return distributed.run_on_coordinator(lambda: sorted(self._manager.all_steps()))

  def latest_step(self) -> int | None:
    """The newest committed step, or None if there is none."""
    return distributed.run_on_coordinator(lambda: self._manager.latest_step())

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
    metadata = {} if metadata is None else metadata
    require(isinstance(metadata, dict), f"metadata={metadata!r} is invalid: expected a dict")
    with reraise(
      (TypeError, ValueError), lambda e: f"metadata is invalid: expected JSON-serializable values ({e})"
    ):
      json.dumps(metadata)
    if distributed.is_multiprocess():
      state = _host_arrays(state)
    distributed.run_on_coordinator(lambda: self._save(step, state, metadata))

  def _save(self, step: int, state: Any, metadata: dict[str, Any]) -> None:
    latest = self.latest_step()
    require(
      latest is None or step > latest,
      f"step={step} is invalid: {self.directory} already holds steps up to {latest}; expected a "
      "step > latest_step() (resume from the latest step, or use a fresh directory)",
    )
    self._manager.save(
      step,
      force=True,
      args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(state), _METADATA: ocp.args.JsonSave(metadata)}
      ),
    )
    self._manager.wait_until_finished()
    write_json_atomic(os.path.join(self.step_path(step), CHECKSUMS), _file_digests(self.step_path(step)))

  def check_step(self, step: int) -> str | None:
    """None if every file of ``step`` matches its checksums, else what is wrong (one line)."""
    return distributed.run_on_coordinator(lambda: self._check_step(step))

  def _check_step(self, step: int) -> str | None:
    path = self.step_path(step)
    try:
      with open(os.path.join(path, CHECKSUMS), encoding="utf-8") as f:
        expected = json.load(f)
    except FileNotFoundError:
      return f"checkpoint {path} has no {CHECKSUMS} (its save was cut short)"
    except (OSError, ValueError) as e:
      return f"checkpoint {path} has an unreadable {CHECKSUMS} ({type(e).__name__}: {e})"
    if not isinstance(expected, dict):
      return f"checkpoint {path} has an unreadable {CHECKSUMS} (not a JSON object)"
    actual = _file_digests(path)
    missing = sorted(expected.keys() - actual.keys())
    changed = sorted(k for k in expected.keys() & actual.keys() if expected[k] != actual[k])
    extra = sorted(actual.keys() - expected.keys())
    if missing or changed or extra:
      parts = [
        f"{what} {names[:3]}"
        for what, names in (("missing", missing), ("changed", changed), ("unexpected", extra))
        if names
      ]
      return f"checkpoint {path} fails its checksums: " + "; ".join(parts)
    return None

  def set_aside(self, step: int, reason: str) -> str:
    """Renames ``step`` to ``<step>.set-aside`` (``-2``, ... if taken) and logs why; returns the new path."""
    return distributed.run_on_coordinator(lambda: self._set_aside(step, reason))

  def _set_aside(self, step: int, reason: str) -> str:
    target = rename_aside(self.step_path(step), SET_ASIDE)
    self._manager.reload()
    logger.warning("%s: set aside as %s", reason, target)
    return target

  def _newest_good(self, read: Any) -> Any:
    """read(step) for the newest step that passes its checksums and reads; bad steps are set aside."""
    for candidate in reversed(self.all_steps()):
      problem = self.check_step(candidate)
      if problem is None:
        try:
          return read(candidate)
        except _UnreadableStep as e:
          problem = str(e)
      self.set_aside(candidate, problem)
    return None

  def restore_metadata(self) -> Restored | None:
    """The newest good step's metadata as ``Restored(step, None, metadata)`` (its state is not read).

    Steps that fail their checksums or cannot be read are set aside as in :meth:`restore`. None when no
    good step is left.
    """
    newest = distributed.run_on_coordinator(
      lambda: self._newest_good(lambda step: (step, self._read_metadata(step)))
    )
    return None if newest is None else Restored(newest[0], None, newest[1])

  def _read_metadata(self, step: int) -> dict[str, Any]:
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()}))[
        _METADATA
      ]
    except Exception as e:  # orbax raises many types on damaged files
      raise _UnreadableStep(f"checkpoint {self.step_path(step)} is unreadable: {_summary(e)}") from e

  def restore(self, template: Any, step: int | None = None) -> Restored | None:
    """Restores a step into the pytree structure of ``template`` (NamedTuple types come back).

    ``template`` is a state of the right structure: concrete arrays or ``jax.ShapeDtypeStruct``s (e.g.
    ``jax.eval_shape(init, key)``); leaf shapes and dtypes must match the checkpoint's.

    With ``step=None`` the newest good step is restored: a step whose files fail their checksums, lack
    them, or cannot be read is set aside (renamed ``<step>.set-aside``, logged) and the next older one is
    tried. An explicit ``step`` is checked the same way but raises instead of being set aside.

    Returns:
      ``Restored(step, state, metadata)``, or None when the directory holds no good step (missing or
      empty directory, only temporary directories of crashed saves, or every step set aside).

    Raises:
      ConfigError: ``template`` does not match the checkpoint (names the mismatching leaves); ``step``
        does not exist, fails its checksums or cannot be read.
    """
    if not distributed.is_multiprocess():
      return self._restore(template, step)
    # Process 0 restores into host arrays (orbax refuses host-local jax arrays when several processes
    # run), then sends the step, metadata and state to the others.
    zeros = jax.tree.map(lambda leaf: np.zeros(*_leaf_spec(leaf)) if _leaf_spec(leaf) else leaf, template)
    restored: list[Restored | None] = [None]

    def restore_here():
      restored[0] = self._restore(zeros, step)
      return None if restored[0] is None else (restored[0].step, restored[0].metadata)

    head = distributed.run_on_coordinator(restore_here)
    if head is None:
      return None
    state = distributed.broadcast_arrays(restored[0].state if restored[0] is not None else zeros)
    return Restored(head[0], state, head[1])

  def _restore(self, template: Any, step: int | None) -> Restored | None:
    if step is not None:
      steps = self.all_steps()
      require(
        step in steps,
        f"step={step!r} is invalid: expected one of the saved steps {steps} in {self.directory}",
      )
      problem = self.check_step(step)
      require(problem is None, str(problem))
      return self._restore_step(step, template)
    return self._newest_good(lambda candidate: self._restore_step(candidate, template))

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
      raise _UnreadableStep(f"checkpoint {path} is unreadable: {_summary(e)}") from e
    return Restored(step, restored[_STATE], restored[_METADATA])

  def close(self) -> None:
    """Waits for pending writes and releases orbax's resources."""
    if self._manager is not None:
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
