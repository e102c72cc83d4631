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
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import jax

from fcfn_jax.validate import check_int, check_positive, require

COORDINATOR_ENV = "FCFN_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "FCFN_NUM_PROCESSES"
PROCESS_ID_ENV = "FCFN_PROCESS_ID"
AUTO_ENV = "FCFN_DISTRIBUTED"

_POLL_S = 0.05
_TAIL_LINES = 15


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
  """True in process 0, the one that writes results."""
  return jax.process_index() == 0


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
