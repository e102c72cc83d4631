"""Speed of one federated DP round (issue 5): per-example clipping methods, DP overhead, vmap vs a loop.

Every ratio comes from ONE run: the cases of a table are compiled first (compile time is reported
separately: AOT lower + compile, or the warm-up of a Python loop), then timed interleaved (round-robin,
--repeats rounds, median), so load changes on a shared machine hit all cases alike.

Modes (--modes, a comma list):
  methods   the round's local training (scan over chunks of vmapped clients, scan over local steps) on
            pre-sampled batches, noise left out (it is the same for every method), with each way to get
            the clipped sum: (a) vmap(grad) through stock flax nn.Conv, (b) vmap(grad) through the im2col
            CNN, (c) ghost clipping (ghost norms from the taps, then a second backward pass of
            sum_j c_j loss_j), (d) book-keeping from the taps (the default); and non-private grads.
  overhead  the real federated_round, DP vs non-private on the same sampled examples, vs the fastest
            non-private batched gradient over those examples (several batchings tried), with XLA
            cost-analysis FLOPs -> achieved FLOP/s next to a measured float32 matmul peak.
  chunks    DP and non-private rounds for several --chunk_sizes.
  loop      vmapped round vs a sequential Python loop over clients (each client's whole update one jitted
            call): the CNN at --clients, logistic regression at --logreg_clients, where the loop runs
            --loop_subset clients and is extrapolated linearly (the table says so); plus the same loop
            with empty calls (its dispatch floor), so loop - floor is the clients' own work; and the
            round's Gaussian noise draws alone (a floor for any vmapped DP round).
  sampling  the DP round with Poisson sampling at several capacities B_max (--capacities, 0 = the
            default) vs fixed-size batches of B, CNN and logistic regression on the same --clients
            writers; each row also gives the epsilon of the largest writer at z = --noise_multiplier over
            --accounting_rounds rounds (RDP with the truncation charge, PLD of the truncated event).
  blocks    the Poisson round with slot blocks (--slot_block, 0 = automatic) vs the same round computing
            every one of its B_max slots (slot_block = B_max: the same samples, so the same update) vs
            fixed-size batches of B, CNN and logistic regression on the same --clients writers, for each
            chunk size of --poisson_chunk_sizes (0 = automatic): a block is skipped only when no client of
            the chunk joined it, so smaller chunks skip more. Each row gives the chunk it ran with, the
            slots it computed per client-step (from round 0's samples), and the ratios to the all-slots
            and fixed rounds of the same chunk size.
  accountant the traced accountant for --accountant_clients clients (float32, as in the round): one
            evaluation of traced.traced_epsilon (value; value and gradient w.r.t. z) at the integer
            orders it used before (INTEGER_TRACED_ORDERS) vs dp-accounting's default orders (fractional,
            integer, 512, 1024: TRACED_ORDERS, the default), side by side; and the inverse
            traced.traced_noise_multiplier (value; gradient w.r.t. eps), ~10 evaluations per client.

Files: round_cases.py (the round's inputs and cases, shared), round_methods.py (methods, overhead),
round_loop.py (chunks, loop), round_sampling.py (sampling, blocks), round_accountant.py (accountant);
this file is the command line (flags, modes, output files).

Example:
  python benchmarks/bench_round.py --quick
  python benchmarks/bench_round.py --modes=overhead,loop --repeats=7
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags
from round_accountant import accountant_table
from round_loop import chunks_table, loop_table
from round_methods import methods_table, overhead_table
from round_sampling import blocks_table, sampling_table

from common import machine, write_tables

MODES = ("methods", "overhead", "chunks", "loop", "sampling", "blocks", "accountant")

flags.DEFINE_list("modes", list(MODES), f"Which tables to measure, from {list(MODES)}.")
flags.DEFINE_string("out", "results/bench_round", "Folder for bench_round.{json,md} and one CSV per table.")
flags.DEFINE_bool("quick", False, "Smoke run: tiny sizes, 2 repeats.")
flags.DEFINE_integer("repeats", 5, "Timed repeats per case (interleaved); the median is reported.")
flags.DEFINE_integer("clients", 64, "Clients per CNN round (FEMNIST writers of the embedded data).")
flags.DEFINE_integer("local_steps", 5, "Local DP-SGD steps per client.")
flags.DEFINE_integer("batch_size", 32, "Local batch size.")
flags.DEFINE_integer(
  "chunk_size",
  1,
  "Clients per vmapped chunk of the CNN round (0 = all at once); 1 is "
  "the fastest on a 2-core CPU (see the 'chunks' table).",
)
flags.DEFINE_list("chunk_sizes", ["1", "4", "16", "0"], "Chunk sizes of the 'chunks' table.")
flags.DEFINE_integer(
  "method_clients",
  16,
  "Clients of the 'methods' table (vmap(grad) of flax convolutions "
  "is slow: about 20 s per 2,500 example-gradients on 2 CPU cores).",
)
flags.DEFINE_integer("logreg_clients", 4096, "Clients of the logistic-regression round of the 'loop' table.")
flags.DEFINE_integer("logreg_chunk_size", 32, "Chunk size of the logistic-regression round (0 = all).")
flags.DEFINE_integer("loop_subset", 256, "Clients the logistic-regression loop actually runs (extrapolated).")
flags.DEFINE_float("clip_norm", 1.0, "Clipping bound C.")
flags.DEFINE_float("noise_multiplier", 1.0, "Noise multiplier z of every client.")
flags.DEFINE_list("capacities", ["40", "48", "64", "0", "96"], "B_max of the 'sampling' table (0 = default).")
flags.DEFINE_integer("accounting_rounds", 10, "Rounds T of the 'sampling' table's epsilon columns.")
flags.DEFINE_integer(
  "slot_block", 0, "Slots per block of the 'blocks' table's blocked rounds (0 = automatic)."
)
flags.DEFINE_list(
  "poisson_chunk_sizes", ["0", "1", "4", "16"], "Chunk sizes of the 'blocks' table (0 = automatic)."
)
flags.DEFINE_integer("accountant_clients", 1000, "Clients of the 'accountant' table.")
FLAGS = flags.FLAGS

# ----------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> None:
  del argv
  for mode in FLAGS.modes:
    if mode not in MODES:
      raise app.UsageError(f"--modes has {mode!r}: expected a comma list from {list(MODES)}")
  if FLAGS.quick:
    FLAGS.repeats, FLAGS.clients, FLAGS.local_steps, FLAGS.batch_size = 2, 8, 2, 16
    FLAGS.method_clients, FLAGS.logreg_clients, FLAGS.loop_subset, FLAGS.chunk_sizes = 4, 256, 32, ["2", "0"]
    FLAGS.capacities = ["24", "0"]
    FLAGS.poisson_chunk_sizes = ["0", "2"]
    FLAGS.accountant_clients = 64
  builders = {
    "methods": methods_table,
    "overhead": overhead_table,
    "chunks": chunks_table,
    "loop": loop_table,
    "sampling": sampling_table,
    "blocks": blocks_table,
    "accountant": accountant_table,
  }
  tables = {}
  for mode in FLAGS.modes:
    print(f"--- {mode} ---", flush=True)
    tables[mode] = builders[mode](FLAGS.repeats)
  meta = {
    **machine(),
    "repeats": FLAGS.repeats,
    "quick": FLAGS.quick,
    "clients": FLAGS.clients,
    "local_steps": FLAGS.local_steps,
    "batch_size": FLAGS.batch_size,
    "chunk_size": FLAGS.chunk_size,
    "clip_norm": FLAGS.clip_norm,
    "noise_multiplier": FLAGS.noise_multiplier,
    "slot_block": FLAGS.slot_block,
    "timing": "cases interleaved, median of repeats; compile_s = AOT lower + compile (Python loops: "
    "the first, compiling run)",
  }
  write_tables(FLAGS.out, "bench_round", tables, meta)


if __name__ == "__main__":
  app.run(main)
