"""Runs any fcfn_jax script as N local processes of one distributed JAX program (loopback coordinator).

Every process runs the same command; the script calls ``fcfn_jax.distributed.initialize()`` and then sees
all processes' devices. Logs go to --logs/process_<i>.log; if one process fails or --timeout_s passes,
all are stopped and the first failure is reported. Example (2 CPU processes):

  python scripts/launch.py --num_processes=2 -- python scripts/compare_mechanisms.py --out=results/mh

On a cluster, do not use this launcher: start one process per host with the scheduler (srun, a TPU pod's
worker command) and set FCFN_DISTRIBUTED=auto so that jax.distributed detects the layout (README
"Multi-host"). Misuse (no command, --num_processes=0, ...) exits with status 2 and one line.
"""

from __future__ import annotations

import sys

from absl import app, flags

from fcfn_jax import distributed
from fcfn_jax.validate import ConfigError

import sim_flags

flags.DEFINE_integer("num_processes", 2, "Processes to start (>= 1).")
flags.DEFINE_string("logs", "results/launch_logs", "Folder of the per-process logs.")
flags.DEFINE_float("timeout_s", 3600.0, "Stop every process after this many seconds.")
FLAGS = flags.FLAGS


def _usage_error(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  # Not sim_flags.run: the launcher itself must not join the runtime it starts.
  command = argv[1:]
  if not command:
    _usage_error("the command is missing: expected it after --, e.g. -- python scripts/compare_mechanisms.py")
  try:
    result = distributed.launch_local(command, FLAGS.num_processes, FLAGS.logs, FLAGS.timeout_s)
  except ConfigError as error:
    _usage_error(str(error))
  if not result.ok:
    print("error: " + distributed.describe_failure(result, FLAGS.timeout_s), file=sys.stderr)
    sys.exit(1)
  print(f"{FLAGS.num_processes} processes finished; logs in {FLAGS.logs}")


if __name__ == "__main__":
  app.run(main, flags_parser=sim_flags.parse_flags)  # bad flags exit 2 with one line; --help exits 0
