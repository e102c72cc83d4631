"""Two processes of one JAX program on this machine (``distributed.launch_local``, gloo collectives) give
the single-process results: the DP round with its clients split over the processes, the game sweep, a
checkpointed simulation resumed across launches; only process 0 writes; a failing process ends the run.

Each test launches tests/multiprocess_program.py (one CPU device per process: the test session's forced
host-device count is left out of their environment) and compares with the same case run here in one
process (tests/multiprocess_cases.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fcfn_jax import distributed, simulation

from . import multiprocess_cases as cases
from .cli import REPO, TINY

PROGRAM = os.path.join(REPO, "tests", "multiprocess_program.py")
TIMEOUT_S = 300.0


def _env() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)


def _launch(command: list[str], log_dir) -> distributed.LaunchResult:
  result = distributed.launch_local(command, 2, log_dir, timeout_s=TIMEOUT_S, env=_env())
  assert result.ok, distributed.describe_failure(result, TIMEOUT_S)
  return result


def _program(tmp_path, *flags: str, out: str = "out") -> tuple[str, list[str]]:
  """Runs the program in 2 processes with ``flags``: (results folder, the processes' logs)."""
  folder = str(tmp_path / out)
  result = _launch([sys.executable, PROGRAM, f"--out={folder}", *flags], tmp_path / f"logs_{out}")
  return folder, [log.read_text() for log in result.logs]


def _flat(tree, prefix: str) -> dict[str, np.ndarray]:
  return {prefix + jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree)}


def _assert_close(
  saved: str, expected: dict[str, np.ndarray], exact: bool = False, atol: float = 1e-6
) -> None:
  with np.load(saved) as got:
    assert sorted(got.files) == sorted(expected)
    for name, value in expected.items():
      if exact:
        np.testing.assert_array_equal(got[name], value, err_msg=name)
      else:
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=atol, err_msg=name)


def test_two_processes_split_the_round_write_once_and_share_checkpoints(tmp_path):
  """The CI smoke: one launch of 2 processes checks the round, the loading, the results and checkpoints."""
  folder, logs = _program(tmp_path, "--checks=round,checkpoint", "--clients=7", "--rounds=2")
  # Each process loaded only its own clients: 7 clients padded to 8 on 2 devices, 4 per process.
  for i, log in enumerate(logs):
    assert re.findall(r"^ROWS .*$", log, re.M) == [f"ROWS {i} {4 * i} {min(4 * i + 4, 7)}"]
  # 2 processes == 1 process: the same keys, so the same round up to the order of the float sums.
  state, history = cases.run_rounds("logreg", 7, 2)
  _assert_close(os.path.join(folder, "round.npz"), {**_flat(state, "state"), **_flat(history, "metrics")})
  # Only process 0 printed the header and wrote the one results folder (no staging folder left).
  assert "process 0 of 2, 2 devices" in logs[0] and "DONE 0" in logs[0]
  assert "devices ->" not in logs[1] and "DONE" not in logs[1]
  assert sorted(os.listdir(tmp_path)) == ["logs_out", "out", "out.checkpoints"]
  assert sorted(os.listdir(folder)) == ["checkpoint.json", "manifest.json", "round.npz"]
  # Process 0 alone saved (one step, its state); every process restored that step.
  with open(os.path.join(folder, "checkpoint.json")) as f:
    assert json.load(f) == {"step": 1, "metadata": {"by": "p0"}, "steps": [1]}
  for i, log in enumerate(logs):
    assert re.findall(r"^RESTORED .*$", log, re.M) == [f"RESTORED {i} 1 [0.0, 1.0, 2.0] 0"]


@pytest.mark.slow
def test_two_process_cnn_round_equals_one_process_round(tmp_path):
  folder, _ = _program(tmp_path, "--checks=round", "--model=cnn", "--clients=9", "--rounds=2")
  state, history = cases.run_rounds("cnn", 9, 2)
  _assert_close(os.path.join(folder, "round.npz"), {**_flat(state, "state"), **_flat(history, "metrics")})


@pytest.mark.slow
def test_two_process_sweep_equals_one_process_sweep_exactly(tmp_path):
  folder, _ = _program(tmp_path, "--checks=sweep")
  # 1 process x 2 devices runs the same program on each device (the same games per device and chunk):
  # where the devices live changes nothing, to the bit.
  two_devices = str(tmp_path / "two_devices")
  env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=2")
  done = subprocess.run(
    [sys.executable, PROGRAM, "--checks=sweep", f"--out={two_devices}"],
    env=env,
    capture_output=True,
    text=True,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  with np.load(os.path.join(two_devices, "sweep.npz")) as expected:
    _assert_close(os.path.join(folder, "sweep.npz"), dict(expected), exact=True)
  # One device compiles another program (no shard_map): the float32 solvers of the social optimum stop
  # within their tolerance of the same optimum (here 2e-4 relative), the closed forms agree to rounding.
  with np.load(os.path.join(folder, "sweep.npz")) as got:
    for name, want in _flat(cases.run_sweep(), "").items():
      np.testing.assert_allclose(got[name], want, rtol=1e-3, atol=1e-5, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("calibration", ["exact", "traced"])  # participants only / all clients in-program
def test_checkpointed_run_resumed_in_two_processes_equals_one_uninterrupted_run(tmp_path, calibration):
  full = simulation.run(cases.simulation_config(calibration=calibration), progress=False)
  flags = ("--checks=simulate", f"--calibration={calibration}")
  partial, _ = _program(tmp_path, *flags, "--stop_after=1")
  with open(os.path.join(partial, "simulate.json")) as f:
    assert len(json.load(f)["history"]) == 1
  folder, logs = _program(tmp_path, *flags)  # the same --out: resumes from <out>.checkpoints
  with open(os.path.join(folder, "simulate.json")) as f:
    resumed = json.load(f)
  assert len(resumed["history"]) == len(full.history) == 3
  for got, want in zip(resumed["history"], full.history):
    assert got.keys() == want.keys()
    for key, value in want.items():
      assert got[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-4, abs=1e-5)), key
  # The privacy ledger (steps per client) and the accounted epsilons are the same, client by client.
  assert [r["steps"] for r in resumed["clients"]] == [r["steps"] for r in full.clients]
  for got, want in zip(resumed["clients"], full.clients):
    assert got["epsilon_spent"] == pytest.approx(want["epsilon_spent"], rel=1e-9)
  # Three rounds of training carry the sums' rounding (2e-5 measured for 'traced', 3e-8 for 'exact').
  _assert_close(os.path.join(folder, "simulate.npz"), _flat(full.state, "state"), atol=1e-4)


@pytest.mark.slow
def test_a_failing_process_ends_the_run_with_its_error(tmp_path):
  start = time.monotonic()
  result = distributed.launch_local(
    [sys.executable, PROGRAM, f"--out={tmp_path / 'out'}", "--fail_in=1"], 2, tmp_path / "logs", 120, _env()
  )
  assert time.monotonic() - start < 100  # process 0 would otherwise wait in the collective for its peer
  assert result.failed == 1 and result.returncodes[1] == 2 and not result.timed_out
  message = distributed.describe_failure(result, 120)
  assert "process 1 exited with status 2" in message
  assert "error: fail_in=1 is this process: failing" in message
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_launch_script_runs_a_comparison_in_two_processes(tmp_path):
  out, logs = tmp_path / "compare", tmp_path / "logs"
  command = [
    sys.executable,
    os.path.join(REPO, "scripts", "launch.py"),
    "--num_processes=2",
    f"--logs={logs}",
  ]
  script = [sys.executable, os.path.join(REPO, "scripts", "compare_mechanisms.py"), *TINY, f"--out={out}"]
  done = subprocess.run(command + ["--", *script], env=_env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  assert "2 processes finished" in done.stdout
  assert "comparison.csv" in os.listdir(out)
  assert "wrote" in (logs / "process_0.log").read_text()
  assert "wrote" not in (logs / "process_1.log").read_text()
