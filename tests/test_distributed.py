"""Multi-process runs on one machine: the launcher, JAX's distributed runtime over gloo, failure handling."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fcfn_jax import distributed
from fcfn_jax.validate import ConfigError, fail

_PROGRAM = textwrap.dedent(
  """
  import sys
  from fcfn_jax import distributed
  distributed.initialize()
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  with distributed.fail_fast():
    if jax.process_index() == int(sys.argv[1]):
      sys.exit(3)  # dies before the collective its peers are about to enter
  mesh = Mesh(np.array(jax.devices()), ("clients",))
  local = np.arange(3, dtype=np.float32) + 100 * jax.process_index()
  arr = jax.make_array_from_process_local_data(NamedSharding(mesh, P("clients")), local)
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(arr)
  print("RESULT", jax.process_index(), jax.process_count(), len(jax.devices()), float(total))
  """
)


def _one_device_env() -> dict[str, str]:
  """The environment without the test session's forced host-device count: one CPU device per process."""
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


@pytest.fixture
def program(tmp_path):
  path = tmp_path / "program.py"
  path.write_text(_PROGRAM)
  return path


def test_two_processes_form_one_mesh_and_reduce_across_it(program, tmp_path):
  result = distributed.launch_local(
    [sys.executable, str(program), "-1"], 2, tmp_path / "logs", timeout_s=120, env=_one_device_env()
  )
  assert result.ok, distributed.describe_failure(result, 120)
  assert result.returncodes == [0, 0]
  # Process p holds [100 p, 100 p + 1, 100 p + 2]: the global sum is 3 + 303 = 306 in both processes.
  for i, log in enumerate(result.logs):
    lines = [line.split() for line in log.read_text().splitlines() if line.startswith("RESULT")]
    assert lines == [["RESULT", str(i), "2", "2", "306.0"]]


def test_a_dead_process_stops_the_others_with_a_clear_error(program, tmp_path):
  start = time.monotonic()
  result = distributed.launch_local(
    [sys.executable, str(program), "1"], 2, tmp_path / "logs", timeout_s=120, env=_one_device_env()
  )
  assert time.monotonic() - start < 60  # process 0 would otherwise wait for its peer in the collective
  assert not result.ok and result.failed == 1 and not result.timed_out
  assert result.returncodes[1] == 3
  assert result.returncodes[0] != 0  # killed (None) or failed, never a clean finish without its peer
  assert "process 1 exited with status 3" in distributed.describe_failure(result, 120)


def test_timeout_stops_every_process(tmp_path):
  command = [sys.executable, "-c", "import time; time.sleep(60)"]
  start = time.monotonic()
  result = distributed.launch_local(command, 2, tmp_path / "logs", timeout_s=1.0)
  assert time.monotonic() - start < 30
  assert result.timed_out and not result.ok and result.returncodes == [None, None]
  assert "timed out after 1 s" in distributed.describe_failure(result, 1.0)


def test_in_one_process_the_coordination_helpers_are_plain_calls():
  """Without the runtime every helper is the identity (or a direct call): scripts pay nothing."""
  assert distributed.is_coordinator() and not distributed.is_multiprocess()
  assert distributed.broadcast_json({"a": [1, 2]}) == {"a": [1, 2]}
  tree = {"w": np.arange(3.0)}
  assert distributed.broadcast_arrays(tree) is tree and distributed.gather(tree) is tree
  assert distributed.run_on_coordinator(lambda: 5) == 5
  with pytest.raises(ConfigError, match="bad value"):
    distributed.run_on_coordinator(lambda: fail("bad value"))
  distributed.barrier("nothing to wait for")


def test_process_rows_and_global_rows_on_this_process_devices():
  mesh = Mesh(np.array(jax.devices()), ("clients",))
  sharding = NamedSharding(mesh, PartitionSpec("clients"))
  n = 2 * len(jax.devices())
  assert distributed.process_rows(n, sharding) == slice(0, n)  # every device is this process's
  asked = []
  rows = np.arange(n * 3).reshape(n, 3)
  arr = distributed.global_rows(sharding, n, lambda block: asked.append(block) or {"r": rows[block]})
  assert asked == [slice(0, n)]
  assert arr["r"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(arr["r"]), rows)


def test_bad_launch_arguments_are_named(tmp_path):
  with pytest.raises(ConfigError, match="command is empty"):
    distributed.launch_local([], 2, tmp_path)
  with pytest.raises(ConfigError, match="num_processes=0"):
    distributed.launch_local(["true"], 0, tmp_path)
  with pytest.raises(ConfigError, match="timeout_s=-1"):
    distributed.launch_local(["true"], 1, tmp_path, timeout_s=-1)


@pytest.mark.parametrize(
  "args, message",
  [([], "the command is missing"), (["--num_processes=0", "--", "true"], "num_processes=0 is invalid")],
)
def test_launch_script_misuse_exits_2_with_one_line(args, message):
  launcher = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "launch.py")
  done = subprocess.run([sys.executable, launcher, *args], capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert done.stderr.startswith("error: " + message) and done.stderr.count("\n") == 1
