"""Per-example clipping and Gaussian noise: the DP-SGD gradient (docs/model.md "From epsilon_i to noise").

For a batch of B slots x_1..x_B with validity mask m (padding slots have m_j = 0), per-example gradients
g_j = grad_theta loss(theta; x_j, y_j), clipping bound C and a noise multiplier z (Abadi et al., 2016):

  clip_C(g) = g * min(1, C / ||g||_2)                    (||.||_2 over the whole parameter pytree)
  g~        = (1 / b) [ sum_j m_j clip_C(g_j) + N(0, (z C)^2 I) ]

b = q n is the EXPECTED batch size of the sampler (min(B, n)), a public constant, not the number of
valid slots: adding one example moves the clipped sum by at most C (Poisson; 2C when it displaces another
from a full batch, or under replace-one), the noise is calibrated to that sum, and dividing both by a
constant is post-processing, whereas dividing by the data-dependent count would leak it. The gradient's
noise std is z C / b. Pure functions in optax's style;
``z`` is an array argument, so one traced program serves a vmapped per-client vector of multipliers.

The single swappable piece is a :data:`ClippedSumFn` (params, x, y, mask, C) -> (sum_j m_j clip_C(g_j),
losses, norms). Two implementations compute the same sum:

- :func:`vmap_clipped_sum`: the reference; materializes every g_j with vmap(grad) (for convolutions that
  becomes grouped convolutions, slow on CPU) and clips them.
- :func:`tapped_clipped_sum`: for models whose every parameter lives in a tapped linear layer of
  :mod:`fcfn_jax.models` (outputs = inputs @ W + b; dense layers and convolutions as im2col patches). One
  forward and one backward pass give each layer's inputs A_j [T, d_in] and output gradients G_j [T, d_out];
  then g_j(W) = A_j^T G_j, g_j(b) = sum_t G_j[t] and, per layer, either the ghost norm
  ||A_j^T G_j||_F^2 = <A_j A_j^T, G_j G_j^T> (cost T^2 (d_in + d_out); Goodfellow 2015, Li et al. 2022) or
  the materialized A_j^T G_j (cost T d_in d_out), whichever is cheaper. The clipped sum is then one matmul
  per layer, sum_j c_j A_j^T G_j = A^T (c * G) with c_j = min(1, C / ||g_j||) ("book-keeping", Bu et al.
  2023), or c^T times the materialized per-example kernels: no second backward pass, and no per-example
  gradient of the large (ghost-norm) layers is ever formed.

:func:`blocked_clipped_sum` computes any of them over a step's slots in blocks, skipping the blocks that
hold no joined slot; :func:`privatize` adds the noise once to the summed blocks.

:func:`make_clipped_sum_fn` picks the tapped path when the model allows it: for the EMNIST CNN the fastest
of the methods, measured against vmap(grad) through ``nn.Conv`` and a non-private gradient in
benchmarks/README.md ("Targets", bench_round.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fcfn_jax.models import TAP_INPUTS, TAP_OUTPUTS, ApplyFn, LossFn, cross_entropy, make_loss_fn
from fcfn_jax.validate import check_int

PerExampleFn = Callable[[chex.ArrayTree, chex.Array, chex.Array], tuple[chex.Array, chex.ArrayTree]]


class ClippedSum(NamedTuple):
  """sum_j m_j clip_C(g_j) (same pytree as params), per-example losses [B] and pre-clip L2 norms [B].

  losses and norms are 0 at masked slots.
  """

  summed: chex.ArrayTree
  losses: chex.Array
  norms: chex.Array


ClippedSumFn = Callable[[chex.ArrayTree, chex.Array, chex.Array, chex.Array, chex.Numeric], ClippedSum]


class PrivateGradient(NamedTuple):
  """One DP-SGD gradient g~ (same pytree as params), per-example losses [B] and pre-clip L2 norms [B].

  losses and norms are 0 at masked slots.
  """

  grad: chex.ArrayTree
  losses: chex.Array
  norms: chex.Array


def per_example_value_and_grad(loss_fn: LossFn) -> PerExampleFn:
  """(losses [B], grads with leading axis [B, ...]) = vmap(value_and_grad(loss)) over the examples.

  ``loss_fn(params, x [b, ...], y [b]) -> [b]`` is called on each example as a batch of one.
  """

  def example_loss(params: chex.ArrayTree, x: chex.Array, y: chex.Array) -> chex.Array:
    return loss_fn(params, x[None], y[None])[0]

  return jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0, 0))


def per_example_norms(grads: chex.ArrayTree) -> chex.Array:
  """||g_j||_2 over all leaves of a pytree with leading example axis [B, ...] -> [B]."""
  squares = [jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1) for g in jax.tree.leaves(grads)]
  return _norm_of_squares(sum(squares))


def _norm_of_squares(squares: chex.Array) -> chex.Array:
  """sqrt(s) with a zero (not NaN) derivative at s = 0: a masked slot's zero gradient stays differentiable
  (``fcfn_jax.hypergrad`` differentiates the rounds through the clipping)."""
  positive = squares > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)


def _clip_factors(norms: chex.Array, clip_norm: chex.Numeric) -> chex.Array:
  """c_j = C / max(||g_j||, C) = min(1, C / ||g_j||), finite at g_j = 0."""
  return clip_norm / jnp.maximum(norms, clip_norm)


def clip_and_sum(
  grads: chex.ArrayTree, mask: chex.Array, clip_norm: chex.Numeric
) -> tuple[chex.ArrayTree, chex.Array]:
  """(sum_j m_j clip_C(g_j), ||m_j g_j||_2 [B]) for per-example grads [B, ...] and mask bool [B].

  Masked slots are zeroed before anything else, so they contribute exactly 0 whatever their inputs.
  """
  grads = jax.tree.map(lambda g: jnp.where(mask.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0), grads)
  norms = per_example_norms(grads)
  factors = _clip_factors(norms, clip_norm)
  return jax.tree.map(lambda g: jnp.tensordot(factors, g, axes=1), grads), norms


def vmap_clipped_sum(per_example_fn: PerExampleFn) -> ClippedSumFn:
  """The reference :data:`ClippedSumFn`: ``per_example_fn`` (e.g. :func:`per_example_value_and_grad`),
  then :func:`clip_and_sum`."""

  def clipped_sum(
    params: chex.ArrayTree, x: chex.Array, y: chex.Array, mask: chex.Array, clip_norm: chex.Numeric
  ) -> ClippedSum:
    losses, grads = per_example_fn(params, x, y)
    summed, norms = clip_and_sum(grads, mask, clip_norm)
    return ClippedSum(summed=summed, losses=jnp.where(mask, losses, 0.0), norms=norms)

  return clipped_sum


# ----------------------------------------------------------------------------------------------------------
# Tapped linear layers: per-example norms and the clipped sum without per-example gradients.
# ----------------------------------------------------------------------------------------------------------

_KERNEL_AND_BIAS = ("kernel", "bias")


class LayerTaps(NamedTuple):
  """One tapped layer of a batch: inputs A [B, T, d_in] and output gradients G [B, T, d_out]."""

  inputs: chex.Array
  out_grads: chex.Array


def _tap_shapes(apply_fn: ApplyFn, params: chex.ArrayTree, x: chex.Array) -> dict[tuple[str, ...], tuple]:
  """{layer path: TAP_OUTPUTS leaf shape} of the model's tapped layers, from an abstract trace."""
  _, state = jax.eval_shape(lambda p, xx: apply_fn({"params": p}, xx, mutable=[TAP_OUTPUTS]), params, x)
  flat = traverse_util.flatten_dict(state.get(TAP_OUTPUTS, {}))
  return {path[:-1]: leaf.shape for path, leaf in flat.items()}


def is_fully_tapped(apply_fn: ApplyFn, params: chex.ArrayTree, x: chex.Array) -> bool:
  """True iff every parameter is the kernel or bias of a tapped layer (static; works under a trace)."""
  layers = _tap_shapes(apply_fn, params, x)
  covered = {layer + (name,) for layer in layers for name in _KERNEL_AND_BIAS}
  return bool(layers) and covered == set(traverse_util.flatten_dict(params))


def tap_gradients(
  apply_fn: ApplyFn, params: chex.ArrayTree, x: chex.Array, y: chex.Array, mask: chex.Array
) -> tuple[chex.Array, dict[tuple[str, ...], LayerTaps]]:
  """(losses [B] with 0 at masked slots, {layer path: LayerTaps}) from one forward and one backward pass.

  G is the gradient of sum_j m_j loss_j w.r.t. the layer outputs, so G_j = dloss_j / d outputs_j (examples
  do not interact). Masked slots are replaced by zeros first: they are then exactly 0 in every G whatever
  their inputs, and no NaN in them can reach A.
  """
  x = jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)
  y = jnp.where(mask, y, 0)
  shapes = _tap_shapes(apply_fn, params, x)
  zeros = traverse_util.unflatten_dict(
    {layer + ("outputs",): jnp.zeros(shape, x.dtype) for layer, shape in shapes.items()}
  )

  def total_loss(perturbations):
    logits, state = apply_fn({"params": params, TAP_OUTPUTS: perturbations}, x, mutable=[TAP_INPUTS])
    losses = jnp.where(mask, cross_entropy(logits, y), 0.0)
    return jnp.sum(losses), (losses, state[TAP_INPUTS])

  out_grads, (losses, inputs) = jax.grad(total_loss, has_aux=True)(zeros)
  out_grads = traverse_util.flatten_dict(out_grads)
  taps = {
    path[:-1]: LayerTaps(inputs=sown[0], out_grads=out_grads[path[:-1] + ("outputs",)])
    for path, sown in traverse_util.flatten_dict(inputs).items()
  }
  return losses, taps


def _use_ghost_norm(taps: LayerTaps) -> bool:
  """Ghost norm iff T^2 (d_in + d_out) < T d_in d_out, i.e. cheaper than materializing A_j^T G_j."""
  _, positions, d_in = taps.inputs.shape
  d_out = taps.out_grads.shape[-1]
  return positions * (d_in + d_out) < d_in * d_out


def _norms_and_kernel_grads(
  taps: dict[tuple[str, ...], LayerTaps],
) -> tuple[chex.Array, dict[tuple[str, ...], chex.Array]]:
  """(||g_j||_2 [B], {layer: A_j^T G_j [B, d_in, d_out]} for the layers where materializing is cheaper).

  ||g_j||^2 = sum over layers of ||A_j^T G_j||_F^2 + ||sum_t G_j[t]||^2 (kernel and bias parts).
  """
  kernel_grads = {
    layer: jnp.einsum("btd,bte->bde", t.inputs, t.out_grads)
    for layer, t in taps.items()
    if not _use_ghost_norm(t)
  }
  squares = []
  for layer, t in taps.items():
    if layer in kernel_grads:
      squares.append(jnp.sum(jnp.square(kernel_grads[layer]), axis=(1, 2)))
    else:
      gram_inputs = jnp.einsum("btd,bsd->bts", t.inputs, t.inputs)
      gram_grads = jnp.einsum("bte,bse->bts", t.out_grads, t.out_grads)
      squares.append(jnp.sum(gram_inputs * gram_grads, axis=(1, 2)))
    squares.append(jnp.sum(jnp.square(jnp.sum(t.out_grads, axis=1)), axis=1))
  return _norm_of_squares(sum(squares)), kernel_grads


def tapped_norms(taps: dict[tuple[str, ...], LayerTaps]) -> chex.Array:
  """Per-example gradient norms ||g_j||_2 [B] from :func:`tap_gradients` (ghost norm where cheaper)."""
  return _norms_and_kernel_grads(taps)[0]


def tapped_clipped_sum(apply_fn: ApplyFn) -> ClippedSumFn:
  """:data:`ClippedSumFn` from layer taps (module docstring); needs an :func:`is_fully_tapped` model.

  Cross-entropy loss of ``apply_fn``'s logits (as :func:`fcfn_jax.models.make_loss_fn`).
  """

  def clipped_sum(
    params: chex.ArrayTree, x: chex.Array, y: chex.Array, mask: chex.Array, clip_norm: chex.Numeric
  ) -> ClippedSum:
    losses, taps = tap_gradients(apply_fn, params, x, y, mask)
    norms, kernel_grads = _norms_and_kernel_grads(taps)
    factors = _clip_factors(norms, clip_norm)
    flat_params = traverse_util.flatten_dict(params)
    summed = {}
    for layer, t in taps.items():
      if layer in kernel_grads:
        kernel = jnp.tensordot(factors, kernel_grads[layer], axes=1)
      else:
        kernel = jnp.einsum("btd,bte->de", t.inputs, factors[:, None, None] * t.out_grads)
      summed[layer + ("kernel",)] = kernel.reshape(flat_params[layer + ("kernel",)].shape)
      summed[layer + ("bias",)] = jnp.einsum("bte,b->e", t.out_grads, factors)
    return ClippedSum(summed=traverse_util.unflatten_dict(summed), losses=losses, norms=norms)

  return clipped_sum


def make_clipped_sum_fn(apply_fn: ApplyFn) -> ClippedSumFn:
  """The fastest exact :data:`ClippedSumFn` for the model: :func:`tapped_clipped_sum` when every
  parameter is tapped (decided at trace time), else :func:`vmap_clipped_sum` of the cross-entropy."""
  tapped = tapped_clipped_sum(apply_fn)
  reference = vmap_clipped_sum(per_example_value_and_grad(make_loss_fn(apply_fn)))

  def clipped_sum(
    params: chex.ArrayTree, x: chex.Array, y: chex.Array, mask: chex.Array, clip_norm: chex.Numeric
  ) -> ClippedSum:
    fn = tapped if is_fully_tapped(apply_fn, params, x) else reference
    return fn(params, x, y, mask, clip_norm)

  return clipped_sum


def add_gaussian_noise(tree: chex.ArrayTree, key: chex.PRNGKey, stddev: chex.Numeric) -> chex.ArrayTree:
  """tree + N(0, stddev^2) independently per coordinate.

  One draw for all coordinates, split into the leaves: a single random-bits kernel instead of one per
  leaf compiles about 10x faster (XLA:CPU) and runs no slower.
  """
  leaves, treedef = jax.tree.flatten(tree)
  sizes = [leaf.size for leaf in leaves]
  noise = jax.random.normal(key, (sum(sizes),), jnp.result_type(*leaves))
  parts = jnp.split(noise, np.cumsum(sizes)[:-1])
  return jax.tree.unflatten(
    treedef, [leaf + stddev * part.reshape(leaf.shape) for leaf, part in zip(leaves, parts)]
  )


def privatize(
  summed: chex.ArrayTree,
  noise_multiplier: chex.Numeric,
  key: chex.PRNGKey,
  clip_norm: chex.Numeric,
  expected_batch: chex.Numeric,
) -> chex.ArrayTree:
  """g~ = (s + N(0, (z C)^2 I)) / b for a clipped sum s = sum_j m_j clip_C(g_j): the Gaussian mechanism
  on s, then division by the expected batch size b = q n > 0 (module docstring; b may be traced)."""
  noisy = add_gaussian_noise(summed, key, noise_multiplier * clip_norm)
  return jax.tree.map(lambda g: g / expected_batch, noisy)


def dp_gradient(
  clipped_sum_fn: ClippedSumFn,
  params: chex.ArrayTree,
  x: chex.Array,
  y: chex.Array,
  mask: chex.Array,
  noise_multiplier: chex.Numeric,
  key: chex.PRNGKey,
  clip_norm: chex.Numeric,
  expected_batch: chex.Numeric,
) -> PrivateGradient:
  """g~ = (sum_j m_j clip_C(g_j) + N(0, (z C)^2 I)) / b for x [slots, H, W, C], y [slots], mask bool [slots].

  ``clipped_sum_fn`` is any :data:`ClippedSumFn` (e.g. :func:`make_clipped_sum_fn` of the model), then
  :func:`privatize`.
  """
  out = clipped_sum_fn(params, x, y, mask, clip_norm)
  grad = privatize(out.summed, noise_multiplier, key, clip_norm, expected_batch)
  return PrivateGradient(grad=grad, losses=out.losses, norms=out.norms)


def blocked_clipped_sum(
  clipped_sum_fn: ClippedSumFn,
  params: chex.ArrayTree,
  load: Callable[[chex.ArrayTree], tuple[chex.Array, chex.Array]],
  slots: chex.ArrayTree,
  mask: chex.Array,
  clip_norm: chex.Numeric,
  block: int,
  used: chex.Array,
  head: int = 0,
) -> ClippedSum:
  """The :data:`ClippedSumFn` sum over B slots: the first ``head`` slots in one plain call, the rest in
  blocks of ``block`` slots, skipping every block that starts at or after ``used`` (and all of them in one
  branch when used <= head).

  sum_j m_j clip_C(g_j) = sum_k sum_{j in block k}, block k = slots [k b, (k + 1) b) (the last one padded
  with masked slots); block k runs under ``lax.cond`` iff used > k b and adds 0 otherwise. Exact whenever
  m_j = 0 for every j >= used, e.g. for a sampler that puts its joined slots first and used >= their count.
  Under vmap give an unbatched ``used`` (e.g. the ``lax.pmax`` of the counts over the vmapped axis): a
  batched predicate turns the cond into a select that computes both branches. With b >= B this is one
  plain call of ``clipped_sum_fn``.

  Args:
    clipped_sum_fn: any :data:`ClippedSumFn`. params: the model.
    load: per-slot inputs of a block (pytree of [b, ...]) -> its examples (x [b, ...], y [b]), e.g. a
      gather of the client's examples by index, so only the blocks that run read their examples.
    slots: pytree of per-slot inputs [B, ...] (e.g. indices int32 [B]). mask: bool [B].
    clip_norm: C. block: static b >= 1. used: int scalar. head: static h >= 0, slots that always run
      (e.g. about the largest joined count: one call instead of h / b conditional blocks).

  Returns:
    ClippedSum with losses and norms [B] (0 at masked slots).
  """
  check_int("block", block)
  check_int("head", head, minimum=0)
  size = mask.shape[0]
  if block >= size or head >= size:
    return clipped_sum_fn(params, *load(slots), mask, clip_norm)
  if head:
    # Not under a cond: a branch around the head costs the CNN's round ~8% on XLA:CPU (measured).
    first = clipped_sum_fn(params, *load(jax.tree.map(lambda a: a[:head], slots)), mask[:head], clip_norm)

    def compute_rest(_):
      tail = jax.tree.map(lambda a: a[head:], slots)
      return blocked_clipped_sum(
        clipped_sum_fn, params, load, tail, mask[head:], clip_norm, block, used - head
      )

    def skip_rest(_):
      return jax.tree.map(jnp.zeros_like, jax.eval_shape(compute_rest, None))

    # The tail's blocks as one branch too: past a head that nearly always holds every joined slot, one
    # skip instead of a skip per block.
    rest = jax.lax.cond(used > head, compute_rest, skip_rest, None)
    return ClippedSum(
      summed=jax.tree.map(jnp.add, first.summed, rest.summed),
      losses=jnp.concatenate([first.losses, rest.losses]),
      norms=jnp.concatenate([first.norms, rest.norms]),
    )
  blocks = -(-size // block)
  pad = blocks * block - size

  def split(a):
    return jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(blocks, block, *a.shape[1:])

  def run_block(summed, inputs):
    start, slot_block, mask_block = inputs

    def compute(summed):
      out = clipped_sum_fn(params, *load(slot_block), mask_block, clip_norm)
      return jax.tree.map(jnp.add, summed, out.summed), out.losses, out.norms

    def skip(summed):
      _, losses, norms = jax.eval_shape(compute, summed)
      return summed, jnp.zeros(losses.shape, losses.dtype), jnp.zeros(norms.shape, norms.dtype)

    summed, losses, norms = jax.lax.cond(used > start, compute, skip, summed)
    return summed, (losses, norms)

  starts = jnp.arange(blocks, dtype=jnp.int32) * block
  zeros = jax.tree.map(jnp.zeros_like, params)
  summed, (losses, norms) = jax.lax.scan(run_block, zeros, (starts, jax.tree.map(split, slots), split(mask)))
  return ClippedSum(summed=summed, losses=losses.reshape(-1)[:size], norms=norms.reshape(-1)[:size])
