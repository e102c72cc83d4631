"""Gradient inversion (DLG / iDLG) against one client's single-step update, and reconstruction quality.

The server reads the gradient off a one-step update of :func:`fcfn_jax.federated.client_update`
(S = 1, batch B = the client's examples, eta = 1): g = -Delta, the plain mean gradient on the non-private
path, or (sum_j clip_C(g_j) + N(0, (z C)^2 I)) / B with DP-SGD.

Attack (Zhu, Liu and Han, "Deep leakage from gradients", 2019; Zhao, Mopuri and Bilen, "iDLG", 2020;
Geiping et al., "Inverting gradients", 2020). Labels: the output bias gradient is
mean_j (softmax_j - e_{y_j}), positive off the batch's labels and (for B = 1 always) negative on them: take
its B most negative entries (iDLG). Images: starting from x' ~ U[0, 1], projected Adam minimizes

  d(g(x'), g) + tv * TV(x'),   g(x') = [sum_j clip_C(grad loss(theta; x'_j, y_j))] / B   (no clip if C = None)

over x' in [0, 1]^{B x H x W x C}, with d the cosine distance 1 - <a, b> / (||a|| ||b||) or the squared L2
distance ||a - b||^2 over the whole parameter pytree, and TV the mean absolute difference of neighbouring
pixels. Logistic regression with B = 1 also inverts in closed form: g_W = x (p - e_y)^T, g_b = p - e_y, so
x = g_W g_b / ||g_b||^2 (:func:`logreg_inversion`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import optimize

from fcfn_jax.config import FederatedConfig, PrivacyConfig
from fcfn_jax.federated import client_update
from fcfn_jax.models import ApplyFn, make_loss_fn
from fcfn_jax.privacy.clipping import clip_and_sum, per_example_value_and_grad
from fcfn_jax.validate import check_choice, check_int, require

DISTANCES = ("cosine", "l2")


class Inversion(NamedTuple):
  """A reconstruction x float32 [B, H, W, C] in [0, 1] for labels int32 [B]; distance [steps] is the
  gradient-matching objective d(g(x'), g) before each optimizer step."""

  x: chex.Array
  labels: chex.Array
  distance: chex.Array


@functools.partial(jax.jit, static_argnames=("apply_fn", "privacy"))
def observed_gradient(
  params: chex.ArrayTree,
  x: chex.Array,
  y: chex.Array,
  noise_multiplier: chex.Numeric,
  key: chex.PRNGKey,
  *,
  apply_fn: ApplyFn,
  privacy: PrivacyConfig,
) -> chex.ArrayTree:
  """g = -Delta of one ``client_update`` step at eta = 1 on the whole batch x uint8 [B, H, W, C], y [B].

  This is exactly what the server learns from a client that runs one local step: the mean gradient
  (privacy.private False) or the DP-SGD gradient with multiplier z and clip privacy.clip_norm.
  """
  batch = x.shape[0]
  fed = FederatedConfig(local_steps=1, batch_size=batch, client_lr=1.0)
  result = client_update(
    params, x, y, jnp.int32(batch), noise_multiplier, key, apply_fn=apply_fn, fed=fed, privacy=privacy
  )
  return jax.tree.map(jnp.negative, result.delta)


def head_bias(tree: chex.ArrayTree) -> chex.Array:
  """The output layer's bias in a params-shaped pytree: its last 1-D leaf in flatten order.

  Flax names layers ``Conv_i``/``Dense_i`` and flattens dicts by sorted key, so the head (the last
  Dense) comes last for the package's models.
  """
  biases = [leaf for leaf in jax.tree.leaves(tree) if leaf.ndim == 1]
  require(bool(biases), "the pytree has no 1-D leaf: expected a model with a biased output layer")
  return biases[-1]


def infer_labels(gradient: chex.ArrayTree, batch: int) -> chex.Array:
  """iDLG labels: the ``batch`` most negative entries of the output bias gradient, int32 [batch].

  g_b = mean_j (p_j - e_{y_j}) is positive at every class absent from the batch; at a present class c it
  is mean_j p_jc - n_c / B, negative unless the model already predicts c confidently. So the B = 1 label
  is exact on a clean gradient; B > 1 assumes distinct labels and an unconfident model (e.g. at init).
  """
  check_int("batch", batch)
  return jnp.argsort(head_bias(gradient))[:batch].astype(jnp.int32)


def logreg_inversion(gradient: chex.ArrayTree, input_shape: Sequence[int]) -> chex.Array:
  """Closed-form input of a logistic regression's single-example gradient: x = g_W g_b / ||g_b||^2.

  For one example, g_W = x (p - e_y)^T [D, K] and g_b = p - e_y [K], so the least-squares x over all K
  columns is exact; on a noised gradient it is the attacker's plug-in estimate. Returns
  float32 [1, H, W, C], clipped to [0, 1].
  """
  leaves = jax.tree.leaves(gradient)
  require(
    len(leaves) == 2 and sorted(leaf.ndim for leaf in leaves) == [1, 2],
    f"gradient has leaves of shapes {[leaf.shape for leaf in leaves]}: expected a logistic "
    "regression's kernel [D, K] and bias [K]",
  )
  kernel, bias = (leaves[0], leaves[1]) if leaves[0].ndim == 2 else (leaves[1], leaves[0])
  x = kernel @ bias / jnp.sum(jnp.square(bias))
  return jnp.clip(x.reshape((1, *input_shape)), 0.0, 1.0)


def gradient_distance(a: chex.ArrayTree, b: chex.ArrayTree, kind: str) -> chex.Array:
  """'cosine': 1 - <a, b> / (||a|| ||b||); 'l2': ||a - b||^2 (over all leaves of the two pytrees)."""
  check_choice("distance", kind, DISTANCES)
  if kind == "cosine":
    norms = optax.tree_utils.tree_norm(a) * optax.tree_utils.tree_norm(b)
    return 1.0 - optax.tree_utils.tree_vdot(a, b) / jnp.maximum(norms, 1e-30)
  return jnp.square(optax.tree_utils.tree_norm(optax.tree_utils.tree_sub(a, b)))


def total_variation(x: chex.Array) -> chex.Array:
  """Mean |x[h+1, w] - x[h, w]| + mean |x[h, w+1] - x[h, w]| of images x [B, H, W, C]."""
  return jnp.mean(jnp.abs(jnp.diff(x, axis=1))) + jnp.mean(jnp.abs(jnp.diff(x, axis=2)))


@functools.partial(
  jax.jit,
  static_argnames=(
    "apply_fn",
    "input_shape",
    "clip_norm",
    "num_steps",
    "learning_rate",
    "distance",
    "tv_weight",
  ),
)
def invert_gradient(
  params: chex.ArrayTree,
  gradient: chex.ArrayTree,
  labels: chex.Array,
  key: chex.PRNGKey,
  *,
  apply_fn: ApplyFn,
  input_shape: tuple[int, ...],
  clip_norm: float | None,
  num_steps: int = 500,
  learning_rate: float = 0.05,
  distance: str = "cosine",
  tv_weight: float = 0.0,
) -> Inversion:
  """DLG with projected Adam: the images x' [B, H, W, C] whose gradient best matches ``gradient``.

  Args:
    params: the model the client differentiated. gradient: the observed g (params pytree).
    labels: int32 [B], e.g. :func:`infer_labels` (iDLG) or the true labels (a stronger attacker).
    key: draws the start x' ~ U[0, 1].
    apply_fn, input_shape: the model and (H, W, C).
    clip_norm: the client's public clipping bound C (None: the observation is an unclipped mean).
    num_steps, learning_rate: Adam iterations (lax.scan) and step size. distance: 'cosine' | 'l2'.
    tv_weight: weight of the total-variation image prior (0 = plain DLG).
  """
  check_int("num_steps", num_steps)
  batch = labels.shape[0]
  per_example_fn = per_example_value_and_grad(make_loss_fn(apply_fn))
  mask = jnp.ones((batch,), bool)

  def objective(x):
    _, grads = per_example_fn(params, x, labels)
    if clip_norm is None:
      summed = jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)
    else:
      summed, _ = clip_and_sum(grads, mask, clip_norm)
    match = gradient_distance(jax.tree.map(lambda s: s / batch, summed), gradient, distance)
    return match + tv_weight * total_variation(x), match

  optimizer = optax.adam(learning_rate)

  def step(carry, _):
    x, opt_state = carry
    (_, match), grad = jax.value_and_grad(objective, has_aux=True)(x)
    updates, opt_state = optimizer.update(grad, opt_state, x)
    return (jnp.clip(optax.apply_updates(x, updates), 0.0, 1.0), opt_state), match

  x0 = jax.random.uniform(key, (batch, *input_shape))
  (x, _), history = jax.lax.scan(step, (x0, optimizer.init(x0)), length=num_steps)
  return Inversion(x=x, labels=labels, distance=history)


def mse(x_hat: chex.Array, x: chex.Array) -> chex.Array:
  """Per-image mean squared error of images [B, H, W, C] -> [B]."""
  return jnp.mean(jnp.square(x_hat - x).reshape(x.shape[0], -1), axis=1)


def psnr(x_hat: chex.Array, x: chex.Array, max_value: float = 1.0) -> chex.Array:
  """Per-image peak signal-to-noise ratio 10 log10(max_value^2 / MSE) in dB: [B] (inf if exact)."""
  return 10.0 * jnp.log10(max_value**2 / mse(x_hat, x))


def match_reconstructions(x_hat: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Permutation pi minimizing sum_j MSE(x_hat[pi_j], x_j) (a batch's order is not identifiable): [B].

  Hungarian algorithm on the [B, B] MSE matrix (host side).
  """
  x_hat, x = np.asarray(x_hat, np.float64), np.asarray(x, np.float64)
  require(x_hat.shape == x.shape, f"x_hat {x_hat.shape} and x {x.shape} are invalid: expected equal shapes")
  cost = np.mean(np.square(x_hat[:, None] - x[None]).reshape(x.shape[0], x.shape[0], -1), axis=2)
  rows, cols = optimize.linear_sum_assignment(cost)
  return rows[np.argsort(cols)]
