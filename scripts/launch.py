"""Runs any fcfn_jax script as N local processes of one distributed JAX program (loopback coordinator).

Every process runs the same command; the script calls ``fcfn_jax.distributed.initialize()`` and then sees
all processes' devices. Logs go to --logs/process_<i>.log; if one process fails or --timeout_s passes,
all are stopped and the first failure is reported. Example (2 CPU processes):

  python scripts/launch.py --num_processes=2 -- python scripts/compare_mechanisms.py --out=results/mh

On a cluster, do not use this launcher: start one process per host with the scheduler (srun, a TPU pod's
worker command) and set FCFN_DISTRIBUTED=auto so that jax.distributed detects the layout.
"""

from __future__ import annotations

import sys

from absl import app, flags

from fcfn_jax import distributed

flags.DEFINE_integer("num_processes", 2, "Processes to start (>= 1).")
flags.DEFINE_string("logs", "results/launch_logs", "Folder of the per-process logs.")
flags.DEFINE_float("timeout_s", 3600.0, "Stop every process after this many seconds.")
FLAGS = flags.FLAGS


def main(argv):
  command = argv[1:]
  if not command:
    raise app.UsageError("expected the command after --, e.g. -- python scripts/compare_mechanisms.py")
  result = distributed.launch_local(command, FLAGS.num_processes, FLAGS.logs, FLAGS.timeout_s)
  if not result.ok:
    print("error: " + distributed.describe_failure(result, FLAGS.timeout_s), file=sys.stderr)
    sys.exit(1)
  print(f"{FLAGS.num_processes} processes finished; logs in {FLAGS.logs}")


if __name__ == "__main__":
  app.run(main)
