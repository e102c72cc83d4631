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

Example:
  python benchmarks/bench_round.py --quick
  python benchmarks/bench_round.py --modes=overhead,loop --repeats=7
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from fcfn_jax import data, federated, models
from fcfn_jax.config import DataConfig, FederatedConfig, PrivacyConfig
from fcfn_jax.privacy import clipping, events, ledger, traced

from common import Case, flops_of, jit_case, machine, matmul_peak_case, measure, resampled_pool, write_tables

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

CLIENT_LR = 0.1
CAPACITY = 64  # slots per client of the resampled logistic-regression pool


# ----------------------------------------------------------------------------------------------------------
# The round's inputs.
# ----------------------------------------------------------------------------------------------------------


class Setup(NamedTuple):
  """A round's inputs: pool (on the device), per-client z and weights, key, configs, initial params."""

  pool: data.ClientPool
  z: jax.Array
  weights: jax.Array
  key: jax.Array
  fed: FederatedConfig
  num_classes: int
  input_shape: tuple[int, int, int]
  params: Any


def writer_setup(clients: int, steps: int, batch: int, chunk: int) -> Setup:
  """``clients`` FEMNIST writers of the embedded data, the EMNIST CNN's initial params."""
  fed_data = data.load_federated(DataConfig(num_clients=clients))
  params = models.init_params(models.CNN(fed_data.num_classes), jax.random.key(0), fed_data.input_shape)
  return Setup(
    jax.device_put(fed_data.pool),
    jnp.full(clients, FLAGS.noise_multiplier),
    jnp.ones(clients),
    jax.random.key(1),
    FederatedConfig(local_steps=steps, batch_size=batch, client_lr=CLIENT_LR, chunk_size=chunk),
    fed_data.num_classes,
    tuple(fed_data.input_shape),
    params,
  )


def fixed_batches(private: bool = True) -> PrivacyConfig:
  """The privacy config of the methods/overhead/chunks/loop tables: fixed-size batches of B, so they
  measure clipping and vectorization on exactly B examples per step as before issue 11; the 'sampling'
  table gives the default Poisson sampler's cost relative to them."""
  return PrivacyConfig(clip_norm=FLAGS.clip_norm, sampling="fixed", private=private)


def round_case(
  name: str, setup: Setup, model: Any, privacy: PrivacyConfig, fed: FederatedConfig | None = None
) -> Case:
  """Case of one federated_round; flops = clients x local steps x one local step's cost analysis."""
  fed = fed or setup.fed
  state = federated.init_server_state(setup.params, fed)
  slots = events.sampler_of(fed, privacy).capacity
  flops = setup.pool.y.shape[0] * fed.local_steps * step_flops(setup, model.apply, privacy.private, slots)
  return jit_case(
    name,
    functools.partial(federated.federated_round, apply_fn=model.apply, fed=fed, privacy=privacy),
    state,
    setup.pool,
    setup.z,
    setup.weights,
    setup.key,
    flops=flops,
  )


def sampled_batches(setup: Setup) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The examples round 0 samples with fixed-size batches: x [clients, S, B, H, W, C], y, mask [clients, S,
  B] (the round's keys). Fixed-size, so every method's table sees exactly B examples per step."""
  round_key = jax.random.fold_in(setup.key, 0)
  sampler = events.Sampler("fixed", setup.fed.batch_size, setup.fed.batch_size)

  def one(i):
    sample_key = jax.random.split(jax.random.fold_in(round_key, i))[0]
    return federated.sample_client_batches(
      sample_key,
      setup.pool.x[i],
      setup.pool.y[i],
      setup.pool.num_examples[i],
      jnp.float32(1.0),
      setup.fed.local_steps,
      sampler,
    )

  return jax.jit(jax.vmap(one))(jnp.arange(setup.pool.y.shape[0]))


def step_flops(setup: Setup, apply_fn: Any, private: bool, slots: int | None = None) -> float:
  """Cost-analysis FLOPs of one client's local step over ``slots`` (default B) slots (clipped sum + noise,
  or the mean gradient)."""
  shape = (slots or setup.fed.batch_size, *setup.input_shape)
  x, y, mask = jnp.zeros(shape), jnp.zeros(shape[0], jnp.int32), jnp.ones(shape[0], bool)
  loss_fn = models.make_loss_fn(apply_fn)
  if private:
    fn = lambda p: (
      clipping.dp_gradient(
        clipping.make_clipped_sum_fn(apply_fn),
        p,
        x,
        y,
        mask,
        FLAGS.noise_multiplier,
        jax.random.key(0),
        FLAGS.clip_norm,
        float(setup.fed.batch_size),
      ).grad
    )
  else:
    fn = lambda p: jax.grad(lambda q: jnp.mean(loss_fn(q, x, y)))(p)
  return flops_of(jax.jit(fn).lower(setup.params).compile())


# ----------------------------------------------------------------------------------------------------------
# Table: per-example methods.
# ----------------------------------------------------------------------------------------------------------


def ghost_clipped_sum(apply_fn: Any) -> clipping.ClippedSumFn:
  """Ghost clipping (Li et al. 2022): tapped norms, then grad of sum_j m_j c_j loss_j (second backward)."""
  loss_fn = models.make_loss_fn(apply_fn)

  def clipped_sum(params, x, y, mask, clip_norm):
    losses, taps = clipping.tap_gradients(apply_fn, params, x, y, mask)
    norms = clipping.tapped_norms(taps)
    factors = jnp.where(mask, clip_norm / jnp.maximum(norms, clip_norm), 0.0)
    x = jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)
    summed = jax.grad(lambda p: jnp.sum(factors * loss_fn(p, x, y)))(params)
    return clipping.ClippedSum(summed=summed, losses=losses, norms=norms)

  return clipped_sum


def local_training(
  step_grad: Callable[..., Any], params: Any, xs: jax.Array, ys: jax.Array, masks: jax.Array, chunk: int
) -> Any:
  """sum_i Delta_i of S local SGD steps per client, in the round's loop structure (no sampling, no noise).

  step_grad(params, x [B, ...], y [B], mask [B]) -> the step's gradient.
  """
  clients = ys.shape[0]
  chunk = chunk or clients

  def one_client(x, y, m):
    def step(p, batch):
      return jax.tree.map(lambda w, g: w - CLIENT_LR * g, p, step_grad(p, *batch)), None

    final = jax.lax.scan(step, params, (x, y, m))[0]
    return jax.tree.map(jnp.subtract, final, params)

  def run_chunk(total, batch):
    if chunk == 1:  # as federated._client_totals: no size-1 vmap
      deltas = jax.tree.map(lambda d: d[None], one_client(*(b[0] for b in batch)))
    else:
      deltas = jax.vmap(one_client)(*batch)
    return jax.tree.map(lambda t, d: t + jnp.sum(d, axis=0), total, deltas), None

  split = lambda a: a.reshape(clients // chunk, chunk, *a.shape[1:])
  zeros = jax.tree.map(jnp.zeros_like, params)
  return jax.lax.scan(run_chunk, zeros, (split(xs), split(ys), split(masks)))[0]


def methods_table(repeats: int) -> list[dict[str, Any]]:
  setup = writer_setup(FLAGS.method_clients, FLAGS.local_steps, FLAGS.batch_size, FLAGS.chunk_size)
  xs, ys, masks = sampled_batches(setup)
  fast, flax_cnn = models.CNN(setup.num_classes), models.FlaxCNN(setup.num_classes)
  batch, clip = setup.fed.batch_size, FLAGS.clip_norm

  def private(clipped_sum_fn):
    return lambda p, x, y, m: jax.tree.map(lambda g: g / batch, clipped_sum_fn(p, x, y, m, clip).summed)

  def non_private(apply_fn):
    loss_fn = models.make_loss_fn(apply_fn)
    return lambda p, x, y, m: jax.grad(lambda q: jnp.sum(jnp.where(m, loss_fn(q, x, y), 0.0)) / batch)(p)

  vmap_grad = lambda apply_fn: clipping.vmap_clipped_sum(
    clipping.per_example_value_and_grad(models.make_loss_fn(apply_fn))
  )
  methods = {
    "(a) vmap(grad), flax nn.Conv": private(vmap_grad(flax_cnn.apply)),
    "(b) vmap(grad), im2col CNN": private(vmap_grad(fast.apply)),
    "(c) ghost clipping, 2 backward passes": private(ghost_clipped_sum(fast.apply)),
    "(d) book-keeping from taps (default)": private(clipping.tapped_clipped_sum(fast.apply)),
    "non-private grad, flax nn.Conv": non_private(flax_cnn.apply),
    "non-private grad, im2col CNN": non_private(fast.apply),
  }
  steps = masks.shape[0] * masks.shape[1]
  step_flops = {
    name: flops_of(jax.jit(fn).lower(setup.params, xs[0, 0], ys[0, 0], masks[0, 0]).compile())
    for name, fn in methods.items()
  }
  rows, results = measure(
    [
      jit_case(
        name,
        functools.partial(local_training, fn, chunk=setup.fed.chunk_size),
        setup.params,
        xs,
        ys,
        masks,
        flops=steps * step_flops[name],
      )
      for name, fn in methods.items()
    ],
    repeats,
  )
  reference = jax.tree.leaves(results[0])
  gradients = int(np.prod(masks.shape))
  fastest_private = min(r["median_s"] for r in rows[:4])
  for row, result in zip(rows, results):
    row["ms_per_1k_example_grads"] = 1e6 * row["median_s"] / gradients
    row["vs_fastest_private"] = row["median_s"] / fastest_private
    if not row["case"].startswith("non-private"):
      row["max_abs_diff_vs_(a)"] = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(result), reference)
      )
  print(
    f"methods: {FLAGS.method_clients} clients x {setup.fed.local_steps} steps x batch {batch} = "
    f"{gradients} example-gradients per run, chunk {setup.fed.chunk_size}"
  )
  return rows


# ----------------------------------------------------------------------------------------------------------
# Table: DP overhead.
# ----------------------------------------------------------------------------------------------------------


def batched_grad_case(
  name: str, apply_fn: Any, params: Any, x: np.ndarray, y: np.ndarray, micro: int
) -> Case:
  """Non-private grad of sum_j loss_j over all (x, y) in micro-batches: one jitted call per micro-batch that
  adds its gradient to the running total (a Python loop: no XLA loop, see models.Conv)."""
  n = y.shape[0]
  calls = -(-n // micro)
  pad = calls * micro - n
  xb = list(
    jnp.asarray(np.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(calls, micro, *x.shape[1:]))
  )
  yb = list(jnp.asarray(np.pad(y, (0, pad)).reshape(calls, micro)))
  mb = list(jnp.asarray((np.arange(calls * micro) < n).reshape(calls, micro)))
  loss_fn = models.make_loss_fn(apply_fn)

  def accumulate(total, p, x, y, m):
    grad = jax.grad(lambda q: jnp.sum(jnp.where(m, loss_fn(q, x, y), 0.0)))(p)
    return jax.tree.map(jnp.add, total, grad)

  zeros = jax.tree.map(jnp.zeros_like, params)

  def prepare():
    compiled = jax.jit(accumulate).lower(zeros, params, xb[0], yb[0], mb[0]).compile()

    def run():
      total = zeros
      for x_i, y_i, m_i in zip(xb, yb, mb):
        total = compiled(total, params, x_i, y_i, m_i)
      return jax.block_until_ready(total)

    return run, calls * flops_of(compiled)

  return Case(f"{name}, {calls} call(s) of {micro}", prepare)


def overhead_table(repeats: int) -> list[dict[str, Any]]:
  setup = writer_setup(FLAGS.clients, FLAGS.local_steps, FLAGS.batch_size, FLAGS.chunk_size)
  fast, flax_cnn = models.CNN(setup.num_classes), models.FlaxCNN(setup.num_classes)
  xs, ys, masks = jax.device_get(sampled_batches(setup))
  valid = masks.reshape(-1)
  x, y = xs.reshape(-1, *setup.input_shape)[valid], ys.reshape(-1)[valid]
  cases = [
    round_case("DP round", setup, fast, fixed_batches()),
    round_case("non-private round", setup, fast, fixed_batches(private=False)),
  ]
  for model, label in ((fast, "batched grad, im2col CNN"), (flax_cnn, "batched grad, flax nn.Conv")):
    for micro in sorted({min(m, y.shape[0]) for m in (y.shape[0], 1024, 256, 64, 32)}, reverse=True):
      cases.append(batched_grad_case(label, model.apply, setup.params, x, y, micro))
  cases.append(matmul_peak_case())
  rows, _ = measure(cases, repeats)
  dp, non_private = rows[0]["median_s"], rows[1]["median_s"]
  fastest = min(r["median_s"] for r in rows if r["case"].startswith("batched grad"))
  for row in rows[:-1]:
    row["dp_round_over_this"] = dp / row["median_s"]
  rows[0]["dp_over_non_private_round"] = dp / non_private
  rows[0]["dp_over_fastest_batched_grad"] = dp / fastest
  print(
    f"overhead: {FLAGS.clients} writers x {setup.fed.local_steps} steps x batch {setup.fed.batch_size} "
    f"({int(valid.sum())} valid of {valid.size} sampled slots), chunk {setup.fed.chunk_size}; "
    f"DP / non-private round = {dp / non_private:.2f}, DP round / fastest batched grad = "
    f"{dp / fastest:.2f}"
  )
  return rows


def chunks_table(repeats: int) -> list[dict[str, Any]]:
  setup = writer_setup(FLAGS.clients, FLAGS.local_steps, FLAGS.batch_size, FLAGS.chunk_size)
  fast = models.CNN(setup.num_classes)
  cases = []
  for chunk in map(int, FLAGS.chunk_sizes):
    fed = dataclasses.replace(setup.fed, chunk_size=chunk)
    for privacy, label in (
      (fixed_batches(), "DP"),
      (fixed_batches(private=False), "non-private"),
    ):
      cases.append(round_case(f"{label} round, chunk {chunk or 'all'}", setup, fast, privacy, fed=fed))
  return measure(cases, repeats)[0]


# ----------------------------------------------------------------------------------------------------------
# Table: vmapped round vs a Python loop over clients.
# ----------------------------------------------------------------------------------------------------------


def loop_case(
  name: str, setup: Setup, model: Any, privacy: PrivacyConfig, subset: int, dispatch_only: bool = False
) -> Case:
  """The round as a Python loop over the first ``subset`` clients: one jitted call per client (its whole
  local update plus accumulation), then one jitted server step; timed per round, scaled to all clients.

  ``dispatch_only``: the same loop and call signature, but each call only adds a_i to the total: the
  loop's floor, what a Python loop costs beyond the clients' own work.
  """
  clients = setup.pool.y.shape[0]
  state = federated.init_server_state(setup.params, setup.fed)
  rows = [tuple(jnp.asarray(a[i]) for a in setup.pool) for i in range(subset)]
  z, w, n = np.asarray(setup.z), np.asarray(setup.weights), np.asarray(setup.pool.num_examples)
  agg = [float(w[i] * n[i]) if np.isfinite(z[i]) else 0.0 for i in range(subset)]

  @jax.jit
  def client(total, params, x, y, num, zi, round_key, i, a):
    if dispatch_only:
      return jax.tree.map(lambda t: t + a, total)
    result = federated.client_update(
      params,
      x,
      y,
      num,
      zi,
      jax.random.fold_in(round_key, i),
      apply_fn=model.apply,
      fed=setup.fed,
      privacy=privacy,
    )
    return jax.tree.map(lambda t, d: t + a * d, total, result.delta)

  optimizer = federated.make_server_optimizer(setup.fed)

  @jax.jit
  def server(state, total, weight):
    updates, opt_state = optimizer.update(
      jax.tree.map(lambda s: -s / weight, total), state.opt_state, state.params
    )
    return federated.ServerState(jax.tree.map(jnp.add, state.params, updates), opt_state, state.round + 1)

  def run():
    round_key = jax.random.fold_in(setup.key, state.round)
    total = jax.tree.map(jnp.zeros_like, state.params)
    for i, (x, y, num) in enumerate(rows):
      total = client(total, state.params, x, y, num, z[i], round_key, i, agg[i])
    return jax.block_until_ready(server(state, total, sum(agg)))

  def prepare():
    run()  # compiles both programs
    return run, None

  label = name if subset == clients else f"{name} ({subset} of {clients} clients, x{clients / subset:g})"
  return Case(label, prepare)


def noise_floor_case(name: str, setup: Setup) -> Case:
  """Only the round's Gaussian noise: per client S draws of N(0, I_P) (P = the model's parameter count),
  in the round's structure (chunks of vmapped clients, a scan over steps). No vmapped DP round can beat it.
  """
  clients, steps = setup.pool.y.shape[0], setup.fed.local_steps
  size = sum(leaf.size for leaf in jax.tree.leaves(setup.params))
  chunk = setup.fed.chunk_size or clients

  def draws(key):
    def one_client(i):
      def step(total, step_key):
        return total + jnp.sum(jax.random.normal(step_key, (size,))), None

      return jax.lax.scan(step, 0.0, jax.random.split(jax.random.fold_in(key, i), steps))[0]

    return jnp.sum(jax.lax.map(one_client, jnp.arange(clients), batch_size=chunk))

  def prepare():
    compiled = jax.jit(draws).lower(setup.key).compile()
    return (lambda: jax.block_until_ready(compiled(setup.key))), None  # FLOPs: no matmuls to count

  return Case(name, prepare)


def loop_table(repeats: int) -> list[dict[str, Any]]:
  rows = []
  cnn_setup = writer_setup(FLAGS.clients, FLAGS.local_steps, FLAGS.batch_size, FLAGS.chunk_size)
  pool, classes = resampled_pool(FLAGS.logreg_clients, CAPACITY)
  logreg = models.LogisticRegression(classes)
  logreg_setup = Setup(
    jax.device_put(pool),
    jnp.full(FLAGS.logreg_clients, FLAGS.noise_multiplier),
    jnp.ones(FLAGS.logreg_clients),
    jax.random.key(1),
    dataclasses.replace(cnn_setup.fed, chunk_size=FLAGS.logreg_chunk_size),
    classes,
    cnn_setup.input_shape,
    models.init_params(logreg, jax.random.key(0), cnn_setup.input_shape),
  )
  privacy = fixed_batches()
  for label, setup, model, subset in (
    (f"CNN, {FLAGS.clients} clients", cnn_setup, models.CNN(cnn_setup.num_classes), FLAGS.clients),
    (
      f"logreg, {FLAGS.logreg_clients} clients",
      logreg_setup,
      logreg,
      min(FLAGS.loop_subset, FLAGS.logreg_clients),
    ),
  ):
    measured, outputs = measure(
      [
        round_case(f"{label}: vmapped round", setup, model, privacy),
        loop_case(f"{label}: Python loop", setup, model, privacy, subset),
        loop_case(f"{label}: Python loop, dispatch only", setup, model, privacy, subset, dispatch_only=True),
        noise_floor_case(f"{label}: the round's noise draws alone", setup),
      ],
      repeats,
    )
    scale = setup.pool.y.shape[0] / subset
    if subset == setup.pool.y.shape[0]:
      measured[1]["max_abs_diff_vs_vmapped"] = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(outputs[0][0].params), jax.tree.leaves(outputs[1].params))
      )
    for row in measured[1:3]:
      row["median_s"] *= scale
      row["min_s"] *= scale
      row["extrapolated_from_clients"] = subset
      row["ms_per_client"] = 1e3 * row["median_s"] / setup.pool.y.shape[0]
    for row in (measured[0], measured[3]):
      row["ms_per_client"] = 1e3 * row["median_s"] / setup.pool.y.shape[0]
    measured[0]["loop_over_vmapped"] = measured[1]["median_s"] / measured[0]["median_s"]
    rows += measured
  return rows


# ----------------------------------------------------------------------------------------------------------
# Table: Poisson sampling at several capacities vs fixed-size batches.
# ----------------------------------------------------------------------------------------------------------


def sampling_table(repeats: int) -> list[dict[str, Any]]:
  cnn_setup = writer_setup(FLAGS.clients, FLAGS.local_steps, FLAGS.batch_size, FLAGS.chunk_size)
  models_ = (
    ("CNN", models.CNN(cnn_setup.num_classes), cnn_setup),
    (
      "logreg",
      models.LogisticRegression(cnn_setup.num_classes),
      cnn_setup._replace(
        params=models.init_params(
          models.LogisticRegression(cnn_setup.num_classes), jax.random.key(0), cnn_setup.input_shape
        ),
        fed=dataclasses.replace(cnn_setup.fed, chunk_size=FLAGS.logreg_chunk_size),
      ),
    ),
  )
  batch, delta = FLAGS.batch_size, 1e-5
  steps = FLAGS.accounting_rounds * FLAGS.local_steps
  n = int(np.max(np.asarray(cnn_setup.pool.num_examples)))  # the largest writer overflows most
  variants = [("fixed", batch, PrivacyConfig(clip_norm=FLAGS.clip_norm, sampling="fixed"))]
  for capacity in map(int, FLAGS.capacities):
    privacy = PrivacyConfig(clip_norm=FLAGS.clip_norm, batch_capacity=capacity)
    variants.append(("poisson", events.sampler_of(cnn_setup.fed, privacy).capacity, privacy))
  rows = []
  for label, model, setup in models_:
    cases = [
      round_case(f"{label}: {kind}, {slots} slots", setup, model, privacy, fed=setup.fed)
      for kind, slots, privacy in variants
    ]
    measured, _ = measure(cases, repeats)
    for row, (kind, slots, privacy) in zip(measured, variants):
      sampler = events.sampler_of(setup.fed, privacy)
      row.update(
        sampler=kind,
        slots=slots,
        slots_over_batch=slots / batch,
        time_over_fixed=row["median_s"] / measured[0]["median_s"],
        overflow_per_step=float(events.overflow_probability(n, 1, sampler)[0]),
      )
      for accountant in ("rdp", "pld") if kind == "poisson" else ("rdp",):
        eps = ledger.accountant_epsilon(FLAGS.noise_multiplier, n, steps, delta, sampler, accountant)
        row[f"eps_{accountant}"] = eps
    rows += measured
  print(
    f"sampling: {FLAGS.clients} writers x {FLAGS.local_steps} steps, B = {batch}; epsilon of the largest "
    f"writer (n = {n}, q = {min(1, batch / n):.3f}) at z = {FLAGS.noise_multiplier} over "
    f"{steps} steps, delta = {delta} (fixed: replace-one, RDP; inf = the truncation charge exceeds delta)"
  )
  return rows


# ----------------------------------------------------------------------------------------------------------
# Table: the Poisson round's slot blocks vs all slots vs fixed-size batches.
# ----------------------------------------------------------------------------------------------------------


def computed_slots(setup: Setup, fed: FederatedConfig, privacy: PrivacyConfig, chunk: int) -> float:
  """Slots per client-step the round computes at its first round: per chunk and step, the blocks up to the
  chunk's largest joined count (the samples of federated.client_update's keys; the last chunk's padding
  clients join nothing)."""
  sampler = events.sampler_of(fed, privacy)
  block, head = federated.slot_block(fed, sampler), federated.head_slots(fed, sampler)
  if block >= sampler.capacity:  # one block: nothing is skipped
    return float(sampler.capacity)
  round_key = jax.random.fold_in(setup.key, 0)
  pool = setup.pool

  def joined(i):
    size = jnp.maximum(pool.num_examples[i], 1)
    _, masks = federated.sample_client_indices(
      jax.random.split(jax.random.fold_in(round_key, i))[0],
      pool.num_examples[i],
      events.sampling_rates(size, fed.batch_size),
      pool.y.shape[1],
      fed.local_steps,
      sampler,
    )
    return jnp.sum(masks, axis=1)

  clients = pool.y.shape[0]
  counts = np.asarray(jax.jit(jax.vmap(joined))(jnp.arange(clients)))  # [clients, S]
  counts = np.pad(counts, ((0, -clients % chunk), (0, 0))).reshape(-1, chunk, fed.local_steps).max(axis=1)
  tail = np.maximum(counts - head, 0)
  slots = np.minimum(head + -(-tail // block) * block, sampler.capacity)
  return float(slots.mean() * chunk * slots.shape[0] / clients)


def round_only_case(
  name: str, setup: Setup, model: Any, fed: FederatedConfig, privacy: PrivacyConfig
) -> Case:
  """Case of one federated_round without FLOPs (XLA's cost analysis counts neither skipped blocks nor
  loop trips)."""
  round_fn = functools.partial(federated.federated_round, apply_fn=model.apply, fed=fed, privacy=privacy)
  args = (federated.init_server_state(setup.params, fed), setup.pool, setup.z, setup.weights, setup.key)

  def prepare():
    compiled = jax.jit(round_fn).lower(*args).compile()
    return (lambda: jax.block_until_ready(compiled(*args))), None

  return Case(name, prepare)


def blocks_table(repeats: int) -> list[dict[str, Any]]:
  cnn_setup = writer_setup(FLAGS.clients, FLAGS.local_steps, FLAGS.batch_size, FLAGS.chunk_size)
  logreg = models.LogisticRegression(cnn_setup.num_classes)
  models_ = (
    ("CNN", models.CNN(cnn_setup.num_classes), cnn_setup),
    (
      "logreg",
      logreg,
      cnn_setup._replace(params=models.init_params(logreg, jax.random.key(0), cnn_setup.input_shape)),
    ),
  )
  poisson = PrivacyConfig(clip_norm=FLAGS.clip_norm)
  fixed = PrivacyConfig(clip_norm=FLAGS.clip_norm, sampling="fixed")
  capacity = events.sampler_of(cnn_setup.fed, poisson).capacity
  clients = cnn_setup.pool.y.shape[0]
  row_shape = jax.ShapeDtypeStruct(cnn_setup.pool.x.shape[1:], cnn_setup.pool.x.dtype)
  rows = []
  for label, model, setup in models_:
    cases, info = [], []
    for chunk_size in map(int, FLAGS.poisson_chunk_sizes):
      base = dataclasses.replace(setup.fed, chunk_size=chunk_size)
      for kind, fed, privacy in (
        ("fixed", base, fixed),
        ("poisson, all slots", dataclasses.replace(base, slot_block=capacity), poisson),
        ("poisson, blocks", dataclasses.replace(base, slot_block=FLAGS.slot_block), poisson),
      ):
        chunk = federated.chunk_clients(fed, privacy, model.apply, setup.params, row_shape, clients)
        block = federated.slot_block(fed, events.sampler_of(fed, privacy))
        cases.append(
          round_only_case(
            f"{label}: {kind}, chunk {chunk_size or 'auto'} ({chunk})", setup, model, fed, privacy
          )
        )
        info.append(
          dict(
            model=label,
            chunk_size=chunk_size,
            chunk=chunk,
            sampler=kind,
            slot_block=block,
            slots_per_client_step=computed_slots(setup, fed, privacy, chunk),
          )
        )
    measured, outputs = measure(cases, repeats)
    for first in range(0, len(cases), 3):
      fixed_row, all_row, blocks_row = measured[first : first + 3]
      for row, extra in zip(measured[first : first + 3], info[first : first + 3]):
        row.update(extra)
      blocks_row["blocks_over_all_slots"] = blocks_row["median_s"] / all_row["median_s"]
      blocks_row["blocks_over_fixed"] = blocks_row["median_s"] / fixed_row["median_s"]
      all_row["all_slots_over_fixed"] = all_row["median_s"] / fixed_row["median_s"]
      blocks_row["max_abs_diff_vs_all_slots"] = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
          jax.tree.leaves(outputs[first + 2][0].params), jax.tree.leaves(outputs[first + 1][0].params)
        )
      )
    rows += measured
  print(
    f"blocks: {FLAGS.clients} writers x {FLAGS.local_steps} steps, B = {FLAGS.batch_size}, B_max = "
    f"{capacity}; slots_per_client_step: the slots a round computes per client and step (fixed: B; all "
    "slots: B_max; blocks: the chunk's blocks up to its largest joined count, from round 0's samples)"
  )
  return rows


# ----------------------------------------------------------------------------------------------------------
# Table: the traced accountant, integer orders vs dp-accounting's orders.
# ----------------------------------------------------------------------------------------------------------


def accountant_table(repeats: int) -> list[dict[str, Any]]:
  clients, steps, delta = FLAGS.accountant_clients, 100.0, 1e-5
  rng = np.random.default_rng(0)
  z = jnp.asarray(np.exp(rng.uniform(np.log(0.5), np.log(20.0), clients)), jnp.float32)
  q = jnp.asarray(10 ** rng.uniform(-3, 0, clients), jnp.float32)
  eps = jnp.asarray(np.exp(rng.uniform(np.log(0.05), np.log(20.0), clients)), jnp.float32)

  def evaluation(orders):
    return lambda z, q: traced.traced_epsilon(z, q, steps, delta, orders)

  def gradient(orders):
    return jax.grad(lambda z, q: jnp.sum(traced.traced_epsilon(z, q, steps, delta, orders)))

  cases, labels = [], []
  for label, orders in (
    ("integer orders 2..63, 128, 256", traced.INTEGER_TRACED_ORDERS),
    ("dp-accounting's default orders", traced.TRACED_ORDERS),
  ):
    cases += [
      jit_case(f"traced_epsilon, {label}", evaluation(orders), z, q),
      jit_case(f"grad traced_epsilon, {label}", gradient(orders), z, q),
    ]
    labels += [(label, "value"), (label, "gradient")]
  inverse = functools.partial(traced.traced_noise_multiplier, steps=steps, delta=delta)
  cases += [
    jit_case("traced_noise_multiplier (default orders)", inverse, eps, q),
    jit_case("grad traced_noise_multiplier", jax.grad(lambda e, q: jnp.sum(inverse(e, q))), eps, q),
  ]
  labels += [
    ("dp-accounting's default orders", "inverse"),
    ("dp-accounting's default orders", "inverse grad"),
  ]
  measured, _ = measure(cases, repeats)
  for row, (orders, what) in zip(measured, labels):
    row.update(orders=orders, what=what, clients=clients, us_per_client=1e6 * row["median_s"] / clients)
  for before, after in ((0, 2), (1, 3)):
    measured[after]["over_integer_orders"] = measured[after]["median_s"] / measured[before]["median_s"]
  print(
    f"accountant: {clients} clients, float32, z in [0.5, 20], q in [1e-3, 1], eps in [0.05, 20], "
    f"{steps:g} steps, delta = {delta}; {len(traced.INTEGER_TRACED_ORDERS)} vs "
    f"{len(traced.TRACED_ORDERS)} orders ({traced.FRACTIONAL_TERMS} terms per fractional series)"
  )
  return measured


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
