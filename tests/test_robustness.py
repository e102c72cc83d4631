"""Robustness: fuzzed configs, game inputs, budgets and data files, and a killed run (bad command lines:
tests/test_cli.py).

Every bad input must end in a ConfigError (or, through a CLI, exit status 2 with one line) whose message
names the value and what is allowed; nothing may crash with another exception or return NaN silently.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import chex
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fcfn_jax import checkpoint, data, simulation, validate
from fcfn_jax import config as fc
from fcfn_jax.game import baselines, misreport, solver
from fcfn_jax.game.spec import Game, GameSpec, spec_from_config, validate_game
from fcfn_jax.privacy import calibration, events, ledger, surrogate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The fuzzed magnitudes (1e300 in float32) overflow on purpose; what matters is the error that follows.
pytestmark = [
  pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
  pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
]

# ----------------------------------------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------------------------------------

CONFIGS = (
  fc.DataConfig,
  fc.ModelConfig,
  fc.PrivacyConfig,
  fc.FederatedConfig,
  fc.GameConfig,
  fc.SimulationConfig,
  fc.RunConfig,
)
CHOICES = (
  fc.DATASETS
  + fc.SOURCES
  + fc.PARTITIONS
  + fc.MODELS
  + fc.ACCOUNTANTS
  + fc.CALIBRATIONS
  + fc.SAMPLERS
  + fc.SERVER_OPTIMIZERS
  + fc.MECHANISMS
  + fc.VALUATIONS
  + fc.AGGREGATIONS
)
MESSAGE_NAMES = {(fc.ModelConfig, "name"): "model"}  # the field is called by what it picks

# Valid-looking and broken values of every kind a config field may be handed.
VALUES = st.one_of(
  st.sampled_from(CHOICES),
  st.none(),
  st.booleans(),
  st.integers(-3, 50),
  st.integers(),
  st.floats(-2.0, 60.0),
  st.floats(),
  st.sampled_from([math.nan, math.inf, -math.inf, 10**400, 2**32, -0.0]),
  st.text(max_size=4),
  st.sampled_from(
    [
      [],
      [1],
      {},
      b"x",
      np.array([1, 2]),
      np.float32(0.5),
      np.int64(3),
      fc.DataConfig(),
      fc.GameConfig(),
      "/tmp/x",
    ]
  ),
)

_TYPES = {
  "str": lambda v: isinstance(v, str),
  "None": lambda v: v is None,
  "bool": lambda v: isinstance(v, bool),
  "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
  "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
}


def _has_annotated_type(value, annotation: str) -> bool:
  """value matches a field annotation such as 'int', 'str | None' or 'DataConfig'."""
  return any(
    _TYPES[t](value) if t in _TYPES else type(value).__name__ == t
    for t in (part.strip() for part in annotation.split("|"))
  )


@FUZZ
@given(st.sampled_from(CONFIGS), st.data())
def test_fuzzed_configs_are_valid_or_a_config_error_naming_the_value(cls, data_object):
  fields = {f.name: f for f in dataclasses.fields(cls)}
  changed = data_object.draw(st.dictionaries(st.sampled_from(sorted(fields)), VALUES, min_size=1, max_size=3))
  try:
    cfg = cls(**changed)
  except validate.ConfigError as err:
    message = str(err)
    assert "\n" not in message
    assert any(
      f"{MESSAGE_NAMES.get((cls, name), name)}={value!r}" in message for name, value in changed.items()
    ), (changed, message)
    assert any(word in message for word in ("expected", "needs", "use ")), message
  else:
    for name, f in fields.items():
      assert _has_annotated_type(getattr(cfg, name), f.type), (name, getattr(cfg, name))
    assert 0 <= getattr(cfg, "seed", 0) < 2**32  # a usable PRNG seed


@pytest.mark.parametrize(
  "build, match",
  [
    (lambda: fc.GameConfig(eps_max=0.0), "eps_max=0.0 is invalid: expected a number > 0"),
    (lambda: fc.GameConfig(eps_max=-1), "eps_max=-1 is invalid"),
    (lambda: fc.GameConfig(lam=10**400), r"lam=1000.* is invalid: expected a finite number"),
    (lambda: fc.GameConfig(mechanism=np.array(["stackelberg"])), r"mechanism=array\(\['stackelberg'\]"),
    (
      lambda: fc.SimulationConfig(seed=2**32),
      r"seed=4294967296 is invalid: expected an integer in \[0, 4294967295\]",
    ),
    (lambda: fc.DataConfig(path=3), "path=3 is invalid: expected a path"),
    (lambda: fc.SimulationConfig(checkpoint_dir=""), "checkpoint_dir='' is invalid: expected a path"),
  ],
)
def test_config_errors_found_by_fuzzing(build, match):
  with pytest.raises(validate.ConfigError, match=match):
    build()


# ----------------------------------------------------------------------------------------------------------
# Game inputs and budgets.
# ----------------------------------------------------------------------------------------------------------

GAME = fc.GameConfig(lam=10.0, eps_max=8.0, num_aggregators=2)
# Cheap to compile for every fuzzed shape; stackelberg and three_party run the same host checks first.
FAST_MECHANISMS = ("contract", "posted_price", "no_incentive", "social_optimum")
_FLOATS = st.one_of(
  st.floats(0.2, 5.0), st.floats(), st.sampled_from([0.0, -1.0, 1e-45, 1e-300, 1e38, 1e300])
)


def _arrays(max_side: int = 4):
  """Float64 arrays of 0-2 dimensions (mostly [N]) with good, extreme, non-finite and negative entries."""
  shapes = st.one_of(
    st.integers(0, max_side).map(lambda n: (n,)), hnp.array_shapes(min_dims=0, max_dims=2, max_side=3)
  )
  return hnp.arrays(np.float64, shapes, elements=_FLOATS)


def _game(costs, weights) -> Game:
  """A Game of raw (possibly broken) per-client arrays and GAME's scalars."""
  return Game(
    costs=costs,
    weights=weights,
    sampling_rates=np.full(np.shape(costs), 0.3),
    lam=np.asarray(GAME.lam),
    eps_max=np.asarray(GAME.eps_max),
    eps_min=np.asarray(GAME.eps_min),
    data_epsilon=np.asarray(GAME.data_epsilon),
  )


def _spec(name: str) -> GameSpec:
  return spec_from_config(dataclasses.replace(GAME, mechanism=name, valuation="log"), 30, 1e-5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(fc.MECHANISMS), _arrays(), st.one_of(_arrays(), st.sampled_from(["w", None, [1, 2]])))
def test_fuzzed_games_give_a_valid_outcome_or_a_config_error(name, costs, weights):
  try:
    if name in FAST_MECHANISMS:
      out = baselines.solve(_game(costs, weights), _spec(name))
    else:
      validate_game(_game(costs, weights))
      return
  except validate.ConfigError as err:
    assert "\n" not in str(err) and ("expected" in str(err) or "needs" in str(err)), str(err)
  else:
    eps = np.asarray(out.budgets)
    assert eps.shape == costs.shape
    assert np.all(np.isfinite(eps)) and np.all((eps >= 0) & (eps <= GAME.eps_max))
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(out))


@pytest.mark.parametrize(
  "costs, weights, match",
  [
    (np.array([1.0, np.nan]), np.ones(2), r"costs\[1\]=nan is invalid: expected finite values > 0"),
    (np.array([1.0, np.inf]), np.ones(2), r"costs\[1\]=inf is invalid"),
    (np.ones(3), np.array([1.0, -2.0, 1.0]), r"weights\[1\]=-2.0 is invalid"),
    (np.ones(0), np.ones(0), r"costs has shape \(0,\): a game needs at least 2 clients"),
    (np.ones(3), np.ones(4), r"per-client shapes .* are invalid: expected one game"),
    (np.array(["a", "b"]), np.ones(2), r"costs has dtype <U1: expected real numbers"),
    (np.ones(3), None, r"weights=None is invalid: expected an array"),
    (np.array([1e300, 1.0]), np.ones(2), r"posted_price is not finite in float32 \(nor in float64\)"),
  ],
)
def test_game_input_errors(costs, weights, match):
  with pytest.raises(validate.ConfigError, match=match):
    baselines.solve(_game(costs, weights), _spec("posted_price"))


SAMPLER = events.Sampler("poisson", 2, 20)  # q = 2 / n for the fuzzed dataset sizes n


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_arrays(max_side=3), st.sampled_from([50, 1, 0, -3, 2.5, math.nan]))
def test_fuzzed_budgets_calibrate_or_raise_a_config_error(eps, num_examples):
  try:
    z = calibration.calibrate_noise_multipliers(eps, num_examples, 20, 1e-5, SAMPLER, "rdp")
  except validate.ConfigError as err:
    assert "\n" not in str(err), str(err)
  else:
    eps, z = np.atleast_1d(eps), np.atleast_1d(z)
    np.testing.assert_array_equal(np.isinf(z), eps == 0)
    assert np.all(z > 0)
    spent = ledger.epsilon_spent(z[eps > 0], num_examples, 20, 1e-5, SAMPLER, "rdp")
    assert np.all(spent <= eps[eps > 0] * (1 + 1e-9))


@pytest.mark.parametrize(
  "build, match",
  [
    (
      lambda: calibration.calibrate_noise_multipliers(np.array([-1.0]), 10, 10, 1e-5, SAMPLER),
      r"eps\[0\]=-1.0 is invalid",
    ),
    (
      lambda: calibration.calibrate_noise_multipliers(np.array(["1"]), 10, 10, 1e-5, SAMPLER),
      r"eps has dtype <U1",
    ),
    (
      lambda: calibration.calibrate_noise_multipliers(np.array([1e300]), 10, 10, 1e-5, SAMPLER),
      r"eps\[0\]=1e\+300 .* needs a noise multiplier outside",
    ),
    (lambda: surrogate.surrogate_noise_multiplier(np.array([1.0, np.nan]), 10, 1e-5), r"eps\[1\]=nan"),
    (lambda: solver.validate_game(np.ones(3), 0.0), r"eps_max=0.0 is invalid: expected finite values > 0"),
    (
      lambda: misreport.misreported_outcome(_game(np.ones(3), np.ones(3)), _spec("posted_price"), [1.0, 2.0]),
      r"factor has shape \(2,\)",
    ),
    (lambda: misreport.choose_liars(0, 0.5), r"num_clients=0 is invalid"),
  ],
)
def test_budget_and_misreport_input_errors(build, match):
  with pytest.raises(validate.ConfigError, match=match):
    build()


# ----------------------------------------------------------------------------------------------------------
# Data files and directories.
# ----------------------------------------------------------------------------------------------------------


def _project_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
  return {
    "train_image": rng.integers(0, 256, (24, 28, 28, 1), dtype=np.uint8),
    "train_label": rng.integers(0, 10, 24),
    "train_writer": rng.integers(0, 4, 24),
    "test_image": rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8),
    "test_label": rng.integers(0, 10, 8),
    "num_classes": np.array(10),
  }


def _npz_bytes(arrays: dict[str, np.ndarray], compressed: bool) -> bytes:
  buffer = io.BytesIO()
  (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
  return buffer.getvalue()


GOOD_ARRAYS = _project_arrays(np.random.default_rng(0))
GOOD_NPZ = {compressed: _npz_bytes(GOOD_ARRAYS, compressed) for compressed in (False, True)}
# Offsets of the zip records ("PK..." local and central headers) and .npy headers in the stored archive:
# flips there exercise zipfile's and numpy's header parsers.
_HEADERS = [
  i
  for i in range(len(GOOD_NPZ[False]))
  if GOOD_NPZ[False][i : i + 2] == b"PK" or GOOD_NPZ[False][i : i + 6] == b"\x93NUMPY"
]


def _flipped(blob: bytes, flips: list[tuple[int, int]]) -> bytes:
  """blob with byte blob[i] set to v for each (i, v)."""
  out = bytearray(blob)
  for i, v in flips:
    out[i % len(out)] = v
  return bytes(out)


NPZ_BLOBS = st.one_of(
  st.binary(max_size=600),
  st.builds(lambda c, t: GOOD_NPZ[c][: int(t * len(GOOD_NPZ[c]))], st.booleans(), st.floats(0, 1)),
  st.builds(
    lambda c, flips: _flipped(GOOD_NPZ[c], flips),
    st.booleans(),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=3),
  ),
  st.builds(
    lambda flips: _flipped(GOOD_NPZ[False], flips),
    st.lists(
      st.builds(
        lambda at, offset, v: (at + offset, v),
        st.sampled_from(_HEADERS),
        st.integers(0, 120),
        st.sampled_from(b"\x00\x01\xff0123456789(),' {}:<|"),
      ),
      min_size=1,
      max_size=2,
    ),
  ),
)


def _load(blob: bytes) -> data.Splits | None:
  """load_npz of ``blob``: the Splits, or None after a one-line ConfigError naming the file."""
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "fuzz.npz")
    with open(path, "wb") as f:
      f.write(blob)
    try:
      return data.load_npz(path)
    except validate.ConfigError as err:
      assert "\n" not in str(err) and "fuzz.npz" in str(err), str(err)
      return None


def _check_splits(splits: data.Splits) -> None:
  for split in splits:
    assert split.x.dtype == np.uint8 and split.x.ndim == 4 and len(split.x) == len(split.y) > 0
    assert np.all((split.y >= 0) & (split.y < split.num_classes))


@FUZZ
@given(NPZ_BLOBS)
def test_fuzzed_npz_bytes_load_or_raise_a_config_error(blob):
  splits = _load(blob)
  if splits is not None:  # a change that left the archive readable still gives validated arrays
    _check_splits(splits)


_BAD_ARRAYS = [
  np.zeros((0, 28, 28, 1), np.uint8),
  np.zeros((24, 28, 28), np.float32),
  np.full(24, np.nan),
  np.arange(24) - 5,
  np.zeros((24, 2), int),
  np.array("x"),
  np.array(2.5),
  np.array([[1]]),
  np.zeros(7, int),
  np.zeros((24, 28, 28, 1), np.uint8),
  np.array([None, 1], dtype=object),
]


@FUZZ
@given(
  st.sets(st.sampled_from(sorted(GOOD_ARRAYS)), max_size=3),
  st.dictionaries(st.sampled_from(sorted(GOOD_ARRAYS)), st.sampled_from(range(len(_BAD_ARRAYS))), max_size=2),
)
def test_npz_with_missing_or_wrong_arrays_is_a_config_error(missing, replaced):
  arrays = {
    k: (_BAD_ARRAYS[replaced[k]] if k in replaced else v) for k, v in GOOD_ARRAYS.items() if k not in missing
  }
  try:
    blob = _npz_bytes(arrays, compressed=False)
  except ValueError:  # numpy itself refuses to save object arrays without pickling
    return
  splits = _load(blob)
  if splits is not None:
    _check_splits(splits)


def test_data_directories_and_files_that_are_not_there(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  cases = [
    (
      lambda: data.load_tfds("cifar10", str(tmp_path)),
      r"tfds dataset 'cifar10' is not available under "
      r"data_dir=.*tfds build cifar10 --file_format=array_rec",
    ),
    (lambda: data.load_tfds("emnist/digits", str(a_file)), "a_file' is not a directory: expected a tfds"),
    (
      lambda: data.load_federated(
        fc.DataConfig(source="tfds", path=str(tmp_path / "missing"), partition="iid")
      ),
      "missing' is not a directory",
    ),
    (lambda: data.load_npz(tmp_path / "missing.npz"), "does not exist"),
    (lambda: data.load_npz(tmp_path), r"cifar10_train_batch1.npz' does not exist"),
    (
      lambda: data.pack_clients(data.make_dataset(np.zeros((4, 2, 2), np.uint8), np.zeros(4, int), 2), []),
      "client_indices is empty",
    ),
    (
      lambda: data.pack_clients(
        data.make_dataset(np.zeros((4, 2, 2), np.uint8), np.zeros(4, int), 2),
        [np.array([0]), np.array([], int)],
      ),
      "client 1 has indices",
    ),
    (
      lambda: data.load_federated(fc.DataConfig(num_clients=5, min_examples_per_client=10**6)),
      "min_examples=1000000 is too large",
    ),
  ]
  for build, match in cases:
    with pytest.raises(validate.ConfigError, match=match) as err:
      build()
    assert "\n" not in str(err.value), str(err.value)


# ----------------------------------------------------------------------------------------------------------
# A run killed mid-checkpoint resumes without losing anything.
# ----------------------------------------------------------------------------------------------------------


def resume_cfg(checkpoint_dir: str | None) -> fc.SimulationConfig:
  """A tiny experiment (used by the killed subprocess too), checkpointing every round when given a dir."""
  return fc.SimulationConfig(
    data=fc.DataConfig(num_clients=8, capacity=32, test_examples=200, seed=0),
    model=fc.ModelConfig(name="logreg"),
    privacy=fc.PrivacyConfig(calibration="exact", accountant="rdp", clip_norm=1.0, delta=1e-5),
    federated=fc.FederatedConfig(rounds=5, local_steps=1, batch_size=8, client_lr=0.5, server_lr=1.0),
    game=fc.GameConfig(mechanism="stackelberg", lam=20.0, eps_max=8.0),
    checkpoint_dir=checkpoint_dir,
    checkpoint_every=1 if checkpoint_dir else 0,
  )


_KILLED_RUN = textwrap.dedent("""
    import os, sys
    from orbax.checkpoint._src.path import async_path
    from fcfn_jax import simulation
    from tests.test_robustness import resume_cfg

    directory, mode = sys.argv[1:]
    if mode == "crash_inside_second_save":
      rename = async_path.rename
      async def crash_before_commit(src, dst):
        if dst.name == "2":  # every file of step 2 is written; only its commit, the rename, is left
          os._exit(17)  # a hard crash: no exception handlers, finally blocks or atexit cleanup run
        return await rename(src, dst)
      async_path.rename = crash_before_commit
    simulation.run(resume_cfg(directory), progress=False)
    os._exit(0)
""")


@pytest.fixture(scope="module")
def uninterrupted():
  cfg = resume_cfg(None)
  fed_data = data.load_federated(cfg.data)
  return fed_data, simulation.run(cfg, fed_data=fed_data, progress=False)


def _wait_for_step(directory: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
  """Polls until step 1 is committed (orbax renames <1>.orbax-checkpoint-tmp-* to <1> last)."""
  deadline = time.monotonic() + timeout
  while not os.path.isdir(os.path.join(directory, "1")):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.monotonic() < deadline, "no checkpoint appeared"
    time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sigkill_after_first_checkpoint", "crash_inside_second_save"])
def test_killed_run_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path, mode):
  fed_data, full = uninterrupted
  directory = str(tmp_path / "ckpt")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.Popen(
    [sys.executable, "-c", _KILLED_RUN, directory, mode],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  if mode == "sigkill_after_first_checkpoint":
    _wait_for_step(directory, proc)
    proc.send_signal(signal.SIGKILL)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == (-signal.SIGKILL if mode.startswith("sigkill") else 17), stderr[-3000:]
  with checkpoint.Checkpointer(directory) as ckpt:
    steps = ckpt.all_steps()
  assert steps and steps[-1] < resume_cfg(None).federated.rounds, steps  # the run really was cut short
  if mode == "crash_inside_second_save":
    assert steps == [1]

  resumed = simulation.run(resume_cfg(directory), fed_data=fed_data, progress=False)
  assert resumed.history == full.history
  chex.assert_trees_all_equal(resumed.state, full.state)
  assert resumed.summary["test_accuracy"] == full.summary["test_accuracy"]
  assert not [name for name in os.listdir(directory) if "tmp" in name]  # the crashed attempt is cleaned up
