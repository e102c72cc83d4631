"""bench_round.py's 'methods' table (each way to get the clipped sum in the round's local training) and
'overhead' table (DP round vs non-private round vs the fastest batched gradient, FLOP/s vs a matmul peak)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from round_cases import CLIENT_LR, fixed_batches, round_case, sampled_batches, writer_setup

from fcfn_jax import models
from fcfn_jax.privacy import clipping

from common import Case, flops_of, jit_case, matmul_peak_case, measure

FLAGS = flags.FLAGS  # defined in bench_round.py

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


REFERENCE_METHOD = "(a) vmap(grad), flax nn.Conv"  # the max_abs_diff_vs_(a) column's reference


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
    REFERENCE_METHOD: private(vmap_grad(flax_cnn.apply)),
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
  output = {row["case"]: result for row, result in zip(rows, results)}
  reference = jax.tree.leaves(output[REFERENCE_METHOD])
  gradients = int(np.prod(masks.shape))
  fastest_private = min(r["median_s"] for r in rows if not r["case"].startswith("non-private"))
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
  peak = matmul_peak_case()
  cases.append(peak)
  rows, _ = measure(cases, repeats)
  row_of = {row["case"]: row for row in rows}
  dp, non_private = row_of["DP round"]["median_s"], row_of["non-private round"]["median_s"]
  fastest = min(r["median_s"] for r in rows if r["case"].startswith("batched grad"))
  for row in rows:
    if row["case"] != peak.name:
      row["dp_round_over_this"] = dp / row["median_s"]
  row_of["DP round"]["dp_over_non_private_round"] = dp / non_private
  row_of["DP round"]["dp_over_fastest_batched_grad"] = dp / fastest
  print(
    f"overhead: {FLAGS.clients} writers x {setup.fed.local_steps} steps x batch {setup.fed.batch_size} "
    f"({int(valid.sum())} valid of {valid.size} sampled slots), chunk {setup.fed.chunk_size}; "
    f"DP / non-private round = {dp / non_private:.2f}, DP round / fastest batched grad = "
    f"{dp / fastest:.2f}"
  )
  return rows
