"""Runs any fcfn_jax script as N local processes of one distributed JAX program (loopback coordinator).

Every process runs the same command; the script calls ``fcfn_jax.distributed.initialize()`` and then sees
all processes' devices. Logs go to --logs/process_<i>.log; if one process fails or --timeout_s passes,
all are stopped and the first failure is reported. Example (2 CPU processes):

  python scripts/launch.py --num_processes=2 -- python scripts/compare_mechanisms.py --out=results/mh

On a cluster, do not use this launcher: start one process per host with the scheduler (srun, a TPU pod's
worker command) and set FCFN_DISTRIBUTED=auto so that jax.distributed detects the layout (README
"Multi-host"). Misuse exits with status 2 and one line before any process starts: no command or no --
before it, a bad flag (--num_processes=0 or 2.5, --logs naming a file or an unwritable place), a command
that is not found.
"""

from __future__ import annotations

import os
import shutil
import sys

from absl import app, flags

from fcfn_jax import distributed, validate
from fcfn_jax.validate import ConfigError

MAX_PROCESSES = 1024
flags.DEFINE_integer("num_processes", 2, f"Processes to start, in [1, {MAX_PROCESSES}].")
flags.DEFINE_string("logs", "results/launch_logs", "Folder of the per-process logs (created if missing).")
flags.DEFINE_float("timeout_s", 3600.0, "Stop every process after this many seconds (> 0).")
FLAGS = flags.FLAGS
_EXAMPLE = "e.g. launch.py --num_processes=2 -- python scripts/compare_mechanisms.py"


def _usage_error(message: str) -> None:
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(2)


def _parse(argv: list[str]) -> list[str]:
  """[program, *command]: the launcher's own flags come before ``--``, the command after it; misuse exits 2
  with one line (a token that is no flag before ``--`` is a command missing its ``--``)."""
  split = argv.index("--") if "--" in argv else len(argv)
  own, command = argv[:split], argv[split + 1 :]
  stray = next((a for a in own[1:] if not a.startswith("-")), None)
  try:
    remaining = FLAGS(own)
  except flags.Error as error:
    if stray is None:
      _usage_error(str(error))
    remaining = [own[0], stray]
  except SystemExit as exit_:  # only absl's help flags exit while the flags are parsed: no error
    sys.exit(0 if exit_.code == 1 else exit_.code)
  if len(remaining) > 1:
    _usage_error(f"{remaining[1]!r} is not a flag of launch.py: expected the command after --, {_EXAMPLE}")
  return [argv[0], *command]


def _check_logs(path: str) -> None:
  """The log folder: an existing writable folder, or one that can be made (its nearest existing parent is a
  writable folder); nothing is created here."""
  validate.require(path, f"logs={path!r} is invalid: expected a folder path")
  validate.require(
    not os.path.exists(path) or os.path.isdir(path), f"logs={path!r} is a file: expected a folder"
  )
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  validate.require(
    os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK),
    f"logs={path!r} is not writable: {existing!r} is "
    + ("a file" if not os.path.isdir(existing) else "a folder this user cannot write"),
  )


def check(command: list[str]) -> None:
  """The flags and the command, checked before any process starts; ConfigError naming what is wrong."""
  validate.require(command, f"the command is missing: expected it after --, {_EXAMPLE}")
  validate.check_int("num_processes", FLAGS.num_processes, maximum=MAX_PROCESSES)
  validate.check_positive("timeout_s", FLAGS.timeout_s)
  validate.require(
    shutil.which(command[0]) is not None,
    f"command {command[0]!r} was not found: expected a program on PATH or the path of an executable file",
  )
  _check_logs(FLAGS.logs)


def main(argv):
  # Not sim_flags.run: the launcher itself must not join the runtime it starts.
  command = argv[1:]
  try:
    check(command)
    with validate.reraise(OSError, lambda e: f"logs={FLAGS.logs!r} is not writable: {e}"):
      os.makedirs(FLAGS.logs, exist_ok=True)
    with validate.reraise(OSError, lambda e: f"command {command[0]!r} could not be started: {e}"):
      result = distributed.launch_local(command, FLAGS.num_processes, FLAGS.logs, FLAGS.timeout_s)
  except ConfigError as error:
    _usage_error(str(error))
  if not result.ok:
    print("error: " + distributed.describe_failure(result, FLAGS.timeout_s), file=sys.stderr)
    sys.exit(1)
  print(f"{FLAGS.num_processes} processes finished; logs in {FLAGS.logs}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
