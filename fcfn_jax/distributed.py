"""Multi-process runs: joining JAX's distributed runtime, and a launcher for N local processes.

One program, many processes (JAX's multi-controller model): every process runs the same script, calls
:func:`initialize` first, and then sees the devices of all processes in ``jax.devices()``; a mesh over them
splits the clients (or games) across processes, and collectives such as ``psum`` cross process boundaries.

Where the process layout comes from:
- Local (tests, one machine): :func:`launch_local` starts N copies of a command with the coordinator on the
  loopback address and a free port, passed in the environment variables ``FCFN_COORDINATOR_ADDRESS``,
  ``FCFN_NUM_PROCESSES`` and ``FCFN_PROCESS_ID``; on CPU the cross-process collectives use gloo.
- A cluster (SLURM, Cloud TPU pods, ...): nothing to pass; ``jax.distributed.initialize()`` detects the
  layout from the scheduler's environment. :func:`initialize` does that when ``FCFN_DISTRIBUTED=auto``.
- Neither: a single process, and :func:`initialize` does nothing.

Coordination (docs/model.md "Multi-host"; every helper is a plain call in a single process):
:func:`run_on_coordinator` runs a side effect once, in process 0, and gives every process its result or
its ConfigError (checkpoint I/O uses it); :func:`broadcast_json` / :func:`broadcast_arrays` send process
0's values; :func:`gather` brings arrays split over processes whole into every process; :func:`global_rows`
builds an array split over processes from each process's own rows (:func:`process_rows`). Work split on the
host (independent items, no collective while they run): :func:`process_block` is this process's share of
N items, :func:`gather_blocks` joins every process's results in process order.

Failure: :func:`fail_fast` ends a failing process at once. :func:`launch_local` then stops the others; on a
cluster their next collective fails on the closed connection (or gloo's 30 s set-up timeout), and JAX's
coordination service ends every process once the dead one misses its heartbeats (100 s by default).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from fcfn_jax.validate import ConfigError, check_int, check_positive, fail, require

COORDINATOR_ENV = "FCFN_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "FCFN_NUM_PROCESSES"
PROCESS_ID_ENV = "FCFN_PROCESS_ID"
AUTO_ENV = "FCFN_DISTRIBUTED"

_POLL_S = 0.05
_TAIL_LINES = 15

T = TypeVar("T")
_coordinator_depth = 0  # > 0 while process 0 runs a block of run_on_coordinator (nested blocks run inline)


def initialize() -> None:
  """Joins the distributed runtime described by the environment (see the module docstring); idempotent.

  Call it before anything else touches JAX's backends. With ``FCFN_NUM_PROCESSES`` set (by
  :func:`launch_local`) the coordinator address and this process's id come from the environment; on CPU
  the cross-process collectives use gloo. With ``FCFN_DISTRIBUTED=auto`` JAX detects a cluster's layout.
  """
  if jax.distributed.is_initialized():
    return
  if os.environ.get(AUTO_ENV) == "auto":
    jax.distributed.initialize()
    return
  if NUM_PROCESSES_ENV not in os.environ:
    return
  num_processes = int(os.environ[NUM_PROCESSES_ENV])
  process_id = int(os.environ[PROCESS_ID_ENV])
  require(
    0 <= process_id < num_processes,
    f"{PROCESS_ID_ENV}={process_id} is invalid: expected an integer in [0, {num_processes})",
  )
  # gloo carries collectives between CPU processes; GPU and TPU backends bring their own.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=os.environ[COORDINATOR_ENV], num_processes=num_processes, process_id=process_id
  )


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
  """Ends this process at once when the block fails, skipping the runtime's graceful shutdown.

  A failing process of a distributed run would otherwise wait at the shutdown barrier for peers that
  wait for it in a collective, and the run would end only when some timeout fires. Exiting immediately
  lets the peers (and :func:`launch_local`) see the failure. In a single process it changes nothing.
  """
  try:
    yield
  except BaseException as error:
    if not jax.distributed.is_initialized():
      raise
    code = error.code if isinstance(error, SystemExit) else 1
    if code in (0, None):
      raise
    if not isinstance(error, SystemExit):
      traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


def is_coordinator() -> bool:
  """True in process 0, the one that writes results (and in a single process)."""
  return not jax.distributed.is_initialized() or jax.process_index() == 0


def is_multiprocess() -> bool:
  """True when this program spans several processes (JAX's distributed runtime joined, N > 1)."""
  return jax.distributed.is_initialized() and jax.process_count() > 1


def broadcast_json(value: Any) -> Any:
  """Process 0's JSON-serializable ``value``, in every process (the others' ``value`` is ignored).

  Two broadcasts: the length of the JSON text, then its bytes (every process must pass arrays of equal
  shape). A single process returns ``value`` unchanged.
  """
  if not is_multiprocess():
    return value
  text = json.dumps(value).encode() if is_coordinator() else b""
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(text))))
  data = np.frombuffer(text, np.uint8) if is_coordinator() else np.zeros(size, np.uint8)
  return json.loads(bytes(multihost_utils.broadcast_one_to_all(data)).decode())


def broadcast_arrays(tree: Any) -> Any:
  """Process 0's pytree of arrays, as numpy arrays in every process (the others pass a tree of the same
  structure, shapes and dtypes, e.g. a template). A single process returns ``tree`` unchanged."""
  if not is_multiprocess():
    return tree
  return multihost_utils.broadcast_one_to_all(tree)


def run_on_coordinator(fn: Callable[[], T]) -> T:
  """``fn()`` run in process 0 only; its JSON-serializable result, or its ConfigError, in every process.

  For side effects that must happen once (renaming, deleting, writing a checkpoint) and decisions every
  process must share even when their file systems differ (only process 0's disk may hold the files).
  Every process must call it at the same point (it is a collective); nested calls in process 0 run
  inline. A single process just calls ``fn()``.

  Raises:
    ConfigError: ``fn`` raised one in process 0 (with the same message in every process).
  """
  global _coordinator_depth
  if not is_multiprocess() or _coordinator_depth:
    return fn()
  outcome: dict[str, Any] = {}
  if is_coordinator():
    _coordinator_depth += 1
    try:
      outcome = {"value": fn()}
    except ConfigError as error:
      outcome = {"error": str(error)}
    finally:
      _coordinator_depth -= 1
  outcome = broadcast_json(outcome)
  if "error" in outcome:
    fail(outcome["error"])
  return outcome["value"]


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (nothing in a single process)."""
  if is_multiprocess():
    multihost_utils.sync_global_devices(name)


def gather(tree: Any) -> Any:
  """Every global array of ``tree`` that spans processes, as its full value (numpy) in every process
  (one all-gather per leaf); other leaves unchanged. Every process must call it (a collective). A single
  process returns ``tree`` unchanged."""
  if not is_multiprocess():
    return tree

  def full(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return multihost_utils.process_allgather(leaf, tiled=True)
    return leaf

  return jax.tree.map(full, tree)


def process_block(count: int, process: int | None = None, processes: int | None = None) -> slice:
  """Items [start, stop) of ``process``'s share when ``count`` items are split into ``processes``
  contiguous blocks in process order (default: this process of this program).

  Block sizes differ by at most one: the first ``count % processes`` processes take one item more. A block
  is empty when count < processes. In a single process: all of them, ``slice(0, count)``.
  """
  process = jax.process_index() if process is None else process
  processes = jax.process_count() if processes is None else processes
  check_int("count", count, minimum=0)
  check_int("processes", processes)
  require(0 <= process < processes, f"process={process} is invalid: expected an integer in [0, {processes})")
  size, extra = divmod(count, processes)
  start = process * size + min(process, extra)
  return slice(start, start + size + (process < extra))


def join_blocks(stacked: Any, counts: Sequence[int]) -> Any:
  """Leaves [processes, max(counts), ...] (process p's block padded to one length) -> [sum(counts), ...]:
  the first ``counts[p]`` rows of each process's block, in process order (numpy)."""
  return jax.tree.map(lambda a: np.concatenate([np.asarray(a[p, :c]) for p, c in enumerate(counts)]), stacked)


def gather_blocks(tree: Any, counts: Sequence[int]) -> Any:
  """Every process's block of rows, joined in process order, in every process: a collective.

  Args:
    tree: this process's results, a pytree of host arrays [counts[this process], ...] (empty blocks keep
      their trailing shape and dtype: every process passes the same structure).
    counts: every process's block length, [processes] (the same list in every process).

  Returns:
    The pytree of numpy arrays [sum(counts), ...] (block 0, then block 1, ...). Each block is padded to
    max(counts) rows for one all-gather and cut back (:func:`join_blocks`); dtypes are kept (64-bit ones
    too). A single process returns ``tree`` unchanged.
  """
  if not is_multiprocess():
    return tree
  require(
    len(counts) == jax.process_count(),
    f"counts={list(counts)} is invalid: expected one block length per process ({jax.process_count()})",
  )
  size, mine = max(max(counts), 1), counts[jax.process_index()]

  def pad(leaf):
    leaf = np.asarray(leaf)
    require(leaf.shape[0] == mine, f"a block of {leaf.shape[0]} rows is invalid: expected counts[p]={mine}")
    return np.pad(leaf, [(0, size - mine)] + [(0, 0)] * (leaf.ndim - 1))

  with jax.enable_x64(True):  # float64 timings and int64 ids cross unchanged
    stacked = multihost_utils.process_allgather(jax.tree.map(pad, tree), tiled=False)
  return join_blocks(stacked, counts)


def process_rows(num_rows: int, sharding: jax.sharding.Sharding) -> slice:
  """The rows [start, stop) of a ``[num_rows, ...]`` array that this process's devices hold under
  ``sharding`` (one contiguous block per process for a 1-D mesh over ``jax.devices()``).

  Raises:
    ConfigError: this process's rows are not one contiguous block (a mesh whose device order
      interleaves processes).
  """
  blocks = sorted(
    (index[0].start or 0, num_rows if index[0].stop is None else index[0].stop)
    for index in sharding.addressable_devices_indices_map((num_rows,)).values()
  )
  start, stop = blocks[0][0], blocks[-1][1]
  require(
    all(a[1] == b[0] or a == b for a, b in zip(blocks, blocks[1:])),
    f"sharding {sharding} gives process {jax.process_index()} the rows {blocks}: expected one contiguous "
    "block (a mesh over jax.devices() in their order)",
  )
  return slice(start, stop)


def global_rows(sharding: jax.sharding.Sharding, num_rows: int, load: Callable[[slice], Any]) -> Any:
  """A global array (pytree) of ``num_rows`` rows split by ``sharding``, each process loading only its
  own rows: ``load(rows)`` returns the pytree of ``[rows, ...]`` arrays of this process's block
  (:func:`process_rows`); ``jax.make_array_from_process_local_data`` joins the blocks without copying
  data between processes."""
  rows = process_rows(num_rows, sharding)
  return jax.tree.map(
    lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a), (num_rows,) + np.shape(a)[1:]),
    load(rows),
  )


def free_port() -> int:
  """A TCP port on the loopback address that was free a moment ago."""
  with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


class LaunchResult(NamedTuple):
  """How a local launch ended: the exit code of every process (None = killed by the launcher), the
  process that failed first (None if all succeeded), whether the timeout fired, and the log files."""

  returncodes: list[int | None]
  failed: int | None
  timed_out: bool
  logs: list[Path]

  @property
  def ok(self) -> bool:
    return self.failed is None and not self.timed_out


def _tail(path: Path, lines: int = _TAIL_LINES) -> str:
  text = path.read_text(errors="replace").splitlines()
  return "\n".join(text[-lines:])


def launch_local(
  command: Sequence[str],
  num_processes: int,
  log_dir: str | os.PathLike[str],
  timeout_s: float = 600.0,
  env: dict[str, str] | None = None,
) -> LaunchResult:
  """Runs ``command`` as ``num_processes`` local processes of one distributed JAX program.

  Process i gets ``FCFN_PROCESS_ID=i`` and the shared coordinator address (loopback, a free port); its
  stdout and stderr go to ``<log_dir>/process_<i>.log``. When any process exits with an error, or the
  timeout passes, every remaining process is killed (a surviving process would otherwise wait forever in
  a collective with its dead peer), so the launch always ends.
  """
  require(len(command) > 0, "command is empty: expected the program to run, e.g. python scripts/x.py ...")
  check_int("num_processes", num_processes)
  check_positive("timeout_s", timeout_s)
  log_dir = Path(log_dir)
  log_dir.mkdir(parents=True, exist_ok=True)
  base_env = dict(os.environ if env is None else env)
  base_env.update(
    {
      COORDINATOR_ENV: f"127.0.0.1:{free_port()}",
      NUM_PROCESSES_ENV: str(num_processes),
      "PYTHONUNBUFFERED": "1",
    }
  )
  logs = [log_dir / f"process_{i}.log" for i in range(num_processes)]
  procs, files = [], []
  try:
    for i, log in enumerate(logs):
      files.append(log.open("w"))
      procs.append(
        subprocess.Popen(
          list(command),
          env={**base_env, PROCESS_ID_ENV: str(i)},
          stdout=files[-1],
          stderr=subprocess.STDOUT,
          start_new_session=True,
        )
      )
    deadline = time.monotonic() + timeout_s
    failed, timed_out = None, False
    while None in (codes := [p.poll() for p in procs]):  # poll every process: it updates returncode
      failed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
      if failed is not None:
        break
      if time.monotonic() > deadline:
        timed_out = True
        break
      time.sleep(_POLL_S)
    if failed is None and not timed_out:
      failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
  finally:
    killed = [p for p in procs if p.poll() is None]
    for p in killed:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, 9)
    for p in procs:
      p.wait()
    for f in files:
      f.close()
  codes = [None if p in killed else p.returncode for p in procs]
  return LaunchResult(returncodes=codes, failed=failed, timed_out=timed_out, logs=logs)


def describe_failure(result: LaunchResult, timeout_s: float) -> str:
  """A message naming what went wrong, with the tail of the failing process's log."""
  if result.timed_out:
    return f"timed out after {timeout_s:g} s; every process was stopped (logs: {result.logs[0].parent})"
  i = result.failed
  return (
    f"process {i} exited with status {result.returncodes[i]}; the others were stopped. "
    f"Last lines of {result.logs[i]}:\n{_tail(result.logs[i])}"
  )
