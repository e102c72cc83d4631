"""Per-example clipping and Gaussian noise: the DP-SGD gradient (DESIGN.md "From epsilon_i to noise").

For a batch of B slots x_1..x_B with validity mask m (padding slots have m_j = 0), per-example gradients
g_j = grad_theta loss(theta; x_j, y_j), clipping bound C and a noise multiplier z (Abadi et al., 2016):

  clip_C(g) = g * min(1, C / ||g||_2)                    (||.||_2 over the whole parameter pytree)
  g~        = (1 / B) [ sum_j m_j clip_C(g_j) + N(0, (z C)^2 I) ]

B is the fixed (expected) batch size, not the number of valid slots, as in DP-SGD: the sum's sensitivity
is C whatever the mask, so dividing by a data-dependent count would leak. Pure functions in optax's style;
``z`` is an array argument, so one traced program serves a vmapped per-client vector of multipliers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from fcfn_jax.models import LossFn

PerExampleFn = Callable[[chex.ArrayTree, chex.Array, chex.Array], tuple[chex.Array, chex.ArrayTree]]


class PrivateGradient(NamedTuple):
  """One DP-SGD gradient g~ (same pytree as params), per-example losses [B] and pre-clip L2 norms [B].

  losses and norms are 0 at masked slots.
  """

  grad: chex.ArrayTree
  losses: chex.Array
  norms: chex.Array


def per_example_value_and_grad(loss_fn: LossFn) -> PerExampleFn:
  """(losses [B], grads with leading axis [B, ...]) = vmap(value_and_grad(loss)) over the examples.

  ``loss_fn(params, x [b, ...], y [b]) -> [b]`` is called on each example as a batch of one. This is the
  single piece to swap for a faster per-example-gradient method (e.g. ghost clipping for convolutions);
  everything downstream only sees its (losses, grads) output.
  """

  def example_loss(params: chex.ArrayTree, x: chex.Array, y: chex.Array) -> chex.Array:
    return loss_fn(params, x[None], y[None])[0]

  return jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0, 0))


def per_example_norms(grads: chex.ArrayTree) -> chex.Array:
  """||g_j||_2 over all leaves of a pytree with leading example axis [B, ...] -> [B]."""
  squares = [jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1) for g in jax.tree.leaves(grads)]
  return jnp.sqrt(sum(squares))


def clip_and_sum(grads: chex.ArrayTree, mask: chex.Array,
                 clip_norm: chex.Numeric) -> tuple[chex.ArrayTree, chex.Array]:
  """(sum_j m_j clip_C(g_j), ||m_j g_j||_2 [B]) for per-example grads [B, ...] and mask bool [B].

  Masked slots are zeroed before anything else, so they contribute exactly 0 whatever their inputs.
  The factor is written C / max(||g||, C) = min(1, C / ||g||) to stay finite at g = 0.
  """
  grads = jax.tree.map(lambda g: jnp.where(mask.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0), grads)
  norms = per_example_norms(grads)
  factors = clip_norm / jnp.maximum(norms, clip_norm)
  return jax.tree.map(lambda g: jnp.tensordot(factors, g, axes=1), grads), norms


def add_gaussian_noise(tree: chex.ArrayTree, key: chex.PRNGKey, stddev: chex.Numeric) -> chex.ArrayTree:
  """tree + N(0, stddev^2) independently per coordinate (one key per leaf, split from ``key``)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noisy = [leaf + stddev * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, noisy)


def dp_gradient(per_example_fn: PerExampleFn, params: chex.ArrayTree, x: chex.Array, y: chex.Array,
                mask: chex.Array, noise_multiplier: chex.Numeric, key: chex.PRNGKey,
                clip_norm: chex.Numeric) -> PrivateGradient:
  """g~ = (sum_j m_j clip_C(g_j) + N(0, (z C)^2 I)) / B for x [B, H, W, C], y [B], mask bool [B].

  ``per_example_fn`` is :func:`per_example_value_and_grad` of the loss (or a drop-in replacement).
  """
  losses, grads = per_example_fn(params, x, y)
  summed, norms = clip_and_sum(grads, mask, clip_norm)
  noisy = add_gaussian_noise(summed, key, noise_multiplier * clip_norm)
  batch = x.shape[0]
  return PrivateGradient(grad=jax.tree.map(lambda g: g / batch, noisy),
                         losses=jnp.where(mask, losses, 0.0), norms=norms)
