"""Checkpointer: round trips, retention, crash safety, checksums, corrupt steps set aside, template errors."""

from __future__ import annotations

import glob
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from fcfn_jax import checkpoint
from fcfn_jax.checkpoint import Checkpointer
from fcfn_jax.validate import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLIENTS = 6


class MechanismState(NamedTuple):
  price: chex.Array  # [clients]
  budgets: chex.Array  # [clients]


class SimState(NamedTuple):
  params: Any
  opt_state: Any
  round: chex.Array
  key: chex.Array  # raw uint32 key
  client_keys: chex.Array  # typed keys [clients]
  privacy_spent: chex.Array  # [clients]
  mechanism: MechanismState


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


@jax.jit  # one compile per process instead of dozens of eager ops per call
def make_state(seed: int) -> SimState:
  """A small but realistic state whose values all depend on ``seed``."""
  key = jax.random.PRNGKey(seed)
  params = _Net().init(key, jnp.zeros((1, 6, 6, 1)))
  opt = optax.adam(1e-2)
  opt_state = opt.init(params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (seed + 1)), params)
  _, opt_state = opt.update(grads, opt_state, params)  # non-trivial moments and count
  spent = jax.random.uniform(jax.random.fold_in(key, 1), (NUM_CLIENTS,))
  mechanism = MechanismState(price=2.0 * spent, budgets=jnp.arange(NUM_CLIENTS, dtype=jnp.float32))
  return SimState(
    params=params,
    opt_state=opt_state,
    round=jnp.asarray(seed, jnp.int32),
    key=key,
    client_keys=jax.random.split(jax.random.key(seed), NUM_CLIENTS),
    privacy_spent=spent,
    mechanism=mechanism,
  )


def _key_data(tree):
  """Typed keys -> their uint32 data, so chex can compare them."""
  return jax.tree.map(
    lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree
  )


def assert_same_state(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  chex.assert_trees_all_equal(_key_data(actual), _key_data(expected), strict=True)


def metadata(step: int) -> dict:
  return {
    "config": {"rounds": 10, "mechanism": "stackelberg"},
    "round": step,
    "history": [{"round": r, "accuracy": 0.1 * r, "participants": r + 2} for r in range(step)],
  }


@pytest.fixture
def ckpt_dir(tmp_path):
  return str(tmp_path / "ckpt")


@pytest.mark.parametrize("template_kind", ["concrete", "abstract"])
def test_roundtrip_is_exact_and_keeps_types(ckpt_dir, template_kind):
  state = make_state(3)
  template = make_state(0) if template_kind == "concrete" else jax.eval_shape(lambda: make_state(0))
  with Checkpointer(ckpt_dir) as ckpt:
    ckpt.save(3, state, metadata(3))
  with Checkpointer(ckpt_dir) as ckpt:  # a fresh process-like reader
    step, restored, meta = ckpt.restore(template)
  assert step == 3
  assert meta == metadata(3)
  assert_same_state(restored, state)
  assert type(restored) is SimState and type(restored.mechanism) is MechanismState
  assert type(restored.opt_state[0]) is optax.ScaleByAdamState
  assert jax.dtypes.issubdtype(restored.client_keys.dtype, jax.dtypes.prng_key)
  assert restored.key.dtype == jnp.uint32


def test_max_to_keep_latest_step_and_explicit_step(ckpt_dir):
  with Checkpointer(ckpt_dir, max_to_keep=2) as ckpt:
    assert ckpt.latest_step() is None
    for step in range(1, 6):
      ckpt.save(step, make_state(step), metadata(step))
      assert ckpt.latest_step() == step
    assert ckpt.all_steps() == [4, 5]
  assert sorted(os.listdir(ckpt_dir)) == ["4", "5"]
  with Checkpointer(ckpt_dir, max_to_keep=2) as ckpt:
    assert ckpt.latest_step() == 5
    restored = ckpt.restore(make_state(0), step=4)
    assert restored.step == 4 and restored.metadata == metadata(4)
    assert_same_state(restored.state, make_state(4))
    with pytest.raises(ConfigError, match=r"step=3 is invalid: expected one of the saved steps \[4, 5\]"):
      ckpt.restore(make_state(0), step=3)


@pytest.mark.parametrize("make_dir", [False, True], ids=["missing", "empty"])
def test_restore_without_checkpoints_returns_none(ckpt_dir, make_dir):
  if make_dir:
    os.makedirs(ckpt_dir)
  with Checkpointer(ckpt_dir) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.restore(make_state(0)) is None


def test_save_rejects_bad_input_before_writing(ckpt_dir):
  with Checkpointer(ckpt_dir) as ckpt:
    ckpt.save(2, make_state(2))
    with pytest.raises(ConfigError, match=r"step=2 is invalid: .* already holds steps up to 2"):
      ckpt.save(2, make_state(2))
    with pytest.raises(ConfigError, match=r"step=-1 is invalid"):
      ckpt.save(-1, make_state(2))
    with pytest.raises(ConfigError, match="metadata is invalid: expected JSON-serializable"):
      ckpt.save(3, make_state(3), {"bad": object()})
    with pytest.raises(ConfigError, match=r"metadata=\[1\] is invalid: expected a dict"):
      ckpt.save(3, make_state(3), [1])
    assert ckpt.all_steps() == [2]
    assert ckpt.restore(make_state(0)).metadata == {}
  assert os.listdir(ckpt_dir) == ["2"]


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda s: s._replace(privacy_spent=jnp.zeros(NUM_CLIENTS + 1)), r"privacy_spent: checkpoint \(\(6,\)"),
    (
      lambda s: s._replace(privacy_spent=s.privacy_spent.astype(jnp.int32)),
      r"privacy_spent: checkpoint .*'float32'\) vs template .*'int32'",
    ),
    (lambda s: s._replace(mechanism={"price": s.mechanism.price}), r"mechanism/budgets: not in the template"),
    (
      lambda s: s._replace(mechanism=s.mechanism._replace(budgets={"a": s.mechanism.budgets})),
      r"mechanism/budgets/a: not in the checkpoint",
    ),
  ],
  ids=["shape", "dtype", "template_lacks_leaf", "template_has_extra_leaf"],
)
def test_template_mismatch_is_a_clear_error(ckpt_dir, change, message):
  with Checkpointer(ckpt_dir) as ckpt:
    ckpt.save(1, make_state(1))
    ckpt.save(2, make_state(2))
    with pytest.raises(ConfigError, match=r"template does not match checkpoint .*ckpt/2 .*" + message):
      ckpt.restore(change(make_state(0)))  # raised at once, not skipped like a damaged step


_CRASHING_SAVE = textwrap.dedent("""
    import os, sys
    from orbax.checkpoint._src.handlers import json_checkpoint_handler
    from orbax.checkpoint._src.path import async_path
    from fcfn_jax.checkpoint import Checkpointer
    from tests.test_checkpoint import make_state, metadata

    directory, crash_point = sys.argv[1:]
    ckpt = Checkpointer(directory)
    ckpt.save(1, make_state(1), metadata(1))
    # os._exit is a hard crash: no exception handlers, finally blocks or atexit cleanup run.
    if crash_point == "mid_write":  # after creating the metadata file, half of it written
      async def save_fn(self, item, directory):
        with open(directory / "metadata", "w") as f:
          f.write('{"round": 2, "hist')
        os._exit(17)
      json_checkpoint_handler.JsonCheckpointHandler._save_fn = save_fn
    else:  # everything written, commit marker too, only the final rename is left
      rename = async_path.rename
      async def crash_before_rename(src, dst):
        if dst.name == "2":
          os._exit(17)
        return await rename(src, dst)
      async_path.rename = crash_before_rename
    ckpt.save(2, make_state(2), metadata(2))
    os._exit(0)  # unreachable if the crash point was hit
""")


@pytest.mark.parametrize("crash_point", [pytest.param("mid_write", marks=pytest.mark.slow), "before_commit"])
def test_crash_mid_save_keeps_previous_step(ckpt_dir, crash_point):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", _CRASHING_SAVE, ckpt_dir, crash_point],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 17, proc.stderr[-3000:]
  leftovers = glob.glob(os.path.join(ckpt_dir, "2.orbax-checkpoint-tmp*"))
  assert leftovers, os.listdir(ckpt_dir)  # the crash really left a partial step behind
  if crash_point == "before_commit":  # complete but uncommitted: only the rename is missing
    assert os.path.exists(os.path.join(leftovers[0], "commit_success.txt"))
  with Checkpointer(ckpt_dir) as ckpt:
    assert ckpt.all_steps() == [1]
    step, state, meta = ckpt.restore(make_state(0))
    assert step == 1 and meta == metadata(1)
    assert_same_state(state, make_state(1))
    assert not any(os.path.exists(p) for p in leftovers)  # reopening cleans the crashed attempt
    ckpt.save(2, make_state(2), metadata(2))  # and the run can redo the step
    assert ckpt.restore(make_state(0)).step == 2


def _flip_one_byte(step_dir):
  """Flips the middle byte of the largest array file: the damage a checksum must catch."""
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  path = max(files, key=os.path.getsize)
  blob = bytearray(pathlib.Path(path).read_bytes())
  blob[len(blob) // 2] ^= 0x01
  pathlib.Path(path).write_bytes(bytes(blob))


_CORRUPTIONS = {
  "truncated_array_data": lambda step_dir: [
    open(f, "w").close() for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  ],
  "one_flipped_byte": _flip_one_byte,
  "garbled_metadata_json": lambda step_dir: pathlib.Path(step_dir, "metadata", "metadata").write_text(
    '{"round": 2, "hist'
  ),
  "deleted_metadata_folder": lambda step_dir: shutil.rmtree(os.path.join(step_dir, "metadata")),
  "missing_tree_metadata": lambda step_dir: os.remove(os.path.join(step_dir, "state", "_METADATA")),
  "empty_step_dir": lambda step_dir: (shutil.rmtree(step_dir), os.mkdir(step_dir)),
  "no_checksums": lambda step_dir: os.remove(os.path.join(step_dir, checkpoint.CHECKSUMS)),
  "garbled_checksums": lambda step_dir: pathlib.Path(step_dir, checkpoint.CHECKSUMS).write_text("[1"),
}


def _reseal(step_dir):
  """Rewrites a step's checksums over its current files: damage the checksums cannot see (orbax must)."""
  digests = checkpoint._file_digests(step_dir)
  pathlib.Path(step_dir, checkpoint.CHECKSUMS).write_text(json.dumps(digests))


# Resealed: the checksums match the damaged files, so orbax's own read must fail (not for the flipped byte,
# which then is valid data, nor for damage to the checksums themselves).
_UNSEALABLE = ("one_flipped_byte", "no_checksums", "garbled_checksums")
_CASES = [(name, False) for name in _CORRUPTIONS] + [(n, True) for n in _CORRUPTIONS if n not in _UNSEALABLE]


# After a failed read orbax can leave a callback aimed at its already closed asyncio loop.
@pytest.mark.filterwarnings("ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("name, resealed", _CASES, ids=[f"{n}{'_resealed' * r}" for n, r in _CASES])
def test_corrupt_newest_step_is_set_aside_and_the_run_saves_over_it(ckpt_dir, name, resealed, caplog):
  with Checkpointer(ckpt_dir) as ckpt:
    ckpt.save(1, make_state(1), metadata(1))
    ckpt.save(2, make_state(2), metadata(2))
    _CORRUPTIONS[name](ckpt.step_path(2))
    if resealed:
      _reseal(ckpt.step_path(2))
  with Checkpointer(ckpt_dir) as ckpt:
    if not resealed:  # an explicit step is refused, not set aside
      with pytest.raises(ConfigError, match=re.escape(f"checkpoint {ckpt.step_path(2)} ")):
        ckpt.restore(make_state(0), step=2)
    with caplog.at_level(logging.WARNING, logger="fcfn_jax.checkpoint"):
      step, state, meta = ckpt.restore(make_state(0))
    assert step == 1 and meta == metadata(1)
    assert_same_state(state, make_state(1))
    assert f"checkpoint {ckpt.step_path(2)} " in caplog.text and "set aside as" in caplog.text
    assert ckpt.all_steps() == [1]
    ckpt.save(2, make_state(5), metadata(2))  # the resumed run saves step 2 again, cleanly
    assert ckpt.restore(make_state(0)).step == 2
  assert sorted(os.listdir(ckpt_dir)) == ["1", "2", "2.set-aside"]  # the bad step is kept for inspection
  with Checkpointer(ckpt_dir) as ckpt:
    step, state, _ = ckpt.restore(make_state(0))
    assert step == 2
    assert_same_state(state, make_state(5))


@pytest.mark.filterwarnings("ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning")
def test_every_step_corrupt_means_a_fresh_start_with_all_kept(ckpt_dir):
  with Checkpointer(ckpt_dir) as ckpt:
    ckpt.save(1, make_state(1), metadata(1))
    ckpt.save(2, make_state(2), metadata(2))
    _flip_one_byte(ckpt.step_path(1))
    _flip_one_byte(ckpt.step_path(2))
  with Checkpointer(ckpt_dir) as ckpt:
    assert ckpt.restore_metadata() is None
    assert ckpt.restore(make_state(0)) is None
    ckpt.save(1, make_state(1), metadata(1))
  assert sorted(os.listdir(ckpt_dir)) == ["1", "1.set-aside", "2.set-aside"]


def test_restore_metadata_reads_the_newest_good_step_without_its_state(ckpt_dir):
  with Checkpointer(ckpt_dir) as ckpt:
    assert ckpt.restore_metadata() is None
    ckpt.save(1, make_state(1), metadata(1))
    ckpt.save(2, make_state(2), metadata(2))
    _flip_one_byte(ckpt.step_path(2))
    restored = ckpt.restore_metadata()
  assert restored.step == 1 and restored.state is None and restored.metadata == metadata(1)


def test_checksums_cover_every_file_and_survive_later_saves(ckpt_dir):
  with Checkpointer(ckpt_dir, max_to_keep=2) as ckpt:
    ckpt.save(1, make_state(1), metadata(1))
    sealed = json.loads(pathlib.Path(ckpt.step_path(1), checkpoint.CHECKSUMS).read_text())
    on_disk = {
      os.path.relpath(os.path.join(root, f), ckpt.step_path(1))
      for root, _, files in os.walk(ckpt.step_path(1))
      for f in files
    }
    assert set(sealed) == on_disk - {checkpoint.CHECKSUMS}
    ckpt.save(2, make_state(2), metadata(2))
    ckpt.restore(make_state(0), step=1)  # reading a step must not change its files
    assert ckpt.check_step(1) is None and ckpt.check_step(2) is None


def test_a_checkpoint_directory_that_is_a_file(tmp_path):
  (tmp_path / "f").write_text("")
  with pytest.raises(ConfigError, match=r"checkpoint directory .*/f' is a file: expected a folder"):
    Checkpointer(tmp_path / "f")


def test_bad_max_to_keep():
  with pytest.raises(ConfigError, match=r"max_to_keep=0 is invalid: expected an integer >= 1"):
    Checkpointer("/nonexistent/never/created", max_to_keep=0)
