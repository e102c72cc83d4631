"""Models: a small flax CNN for EMNIST/CIFAR-10 and multinomial logistic regression.

Every model maps float32 images [batch, H, W, C] in [0, 1] (see :func:`normalize_pixels`) to logits
[batch, num_classes]. Functions that train or evaluate take ``apply_fn = model.apply`` (flax convention
``apply_fn({"params": params}, x)``) so they stay independent of the architecture. No normalization
layers: batch statistics would couple examples and break per-example DP-SGD.

Every layer with parameters is a tapped linear map (:class:`Dense`, and :class:`Conv` as im2col patches
@ kernel), which lets :mod:`fcfn_jax.privacy.clipping` clip per-example gradients without vmap(grad).
:class:`FlaxCNN` is the same CNN from stock flax layers, the reference for tests and benchmarks.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import chex
import flax.linen as nn
import jax.numpy as jnp
import optax

from fcfn_jax.config import ModelConfig
from fcfn_jax.validate import check_int, require

ApplyFn = Callable[..., chex.Array]
LossFn = Callable[[chex.ArrayTree, chex.Array, chex.Array], chex.Array]


TAP_INPUTS = "tap_inputs"
TAP_OUTPUTS = "tap_outputs"


def _linear(module: nn.Module, inputs: chex.Array, kernel: chex.Array, bias: chex.Array) -> chex.Array:
  """outputs [B, T, d_out] = inputs [B, T, d_in] @ kernel.reshape(d_in, d_out) + bias, with taps.

  The taps make the layer's per-example gradients recoverable without materializing them: ``inputs`` is
  sown into the TAP_INPUTS collection and a zero perturbation in TAP_OUTPUTS is added to ``outputs``, so
  grad w.r.t. that perturbation is dL/d outputs. Then dL_j/d kernel = inputs_j^T (dL_j/d outputs_j) and
  dL_j/d bias = sum_t dL_j/d outputs_j[t] (see :mod:`fcfn_jax.privacy.clipping`). Without those
  collections in ``apply`` the taps are no-ops.
  """
  module.sow(TAP_INPUTS, "inputs", inputs)
  outputs = jnp.dot(inputs, kernel.reshape(inputs.shape[-1], -1)) + bias
  return module.perturb("outputs", outputs, collection=TAP_OUTPUTS)


class Dense(nn.Module):
  """Fully connected layer [batch, d_in] -> [batch, features] with taps; params as ``nn.Dense``'s."""

  features: int

  @nn.compact
  def __call__(self, x: chex.Array) -> chex.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    return _linear(self, x[:, None, :], kernel, bias)[:, 0]


def conv_patches(x: chex.Array, kernel_size: tuple[int, int]) -> chex.Array:
  """im2col for a stride-1 'SAME' convolution: [B, H, W, C] -> [B, H, W, kh * kw * C].

  Patch features are ordered (i, j, c), i.e. patches @ kernel.reshape(kh * kw * C, F) is the convolution
  with kernel [kh, kw, C, F]. Built from kh * kw shifted slices of the zero-padded input (flax's SAME
  padding: (k - 1) // 2 before, the rest after).
  """
  kh, kw = kernel_size
  height, width = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
  return jnp.concatenate(
    [padded[:, i : i + height, j : j + width] for i in range(kh) for j in range(kw)], axis=-1
  )


class Conv(nn.Module):
  """Stride-1 'SAME' convolution [B, H, W, C] -> [B, H, W, features] with taps; params as ``nn.Conv``'s.

  Computed as im2col patches @ kernel: per-example kernel gradients become batched matmuls, and no
  ``lax.conv`` runs inside the round's loops, where XLA:CPU runs it many times slower than outside.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)

  @nn.compact
  def __call__(self, x: chex.Array) -> chex.Array:
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (*self.kernel_size, x.shape[-1], self.features)
    )
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    patches = conv_patches(x, self.kernel_size)
    batch, height, width, depth = patches.shape
    outputs = _linear(self, patches.reshape(batch, height * width, depth), kernel, bias)
    return outputs.reshape(batch, height, width, self.features)


def max_pool_2x2(x: chex.Array) -> chex.Array:
  """2x2 max-pool with stride 2 ('VALID'): [B, H, W, C] -> [B, H // 2, W // 2, C].

  The max of four strided slices rather than ``nn.max_pool``: XLA:CPU's reduce_window gradient
  (select-and-scatter) is several times slower than the elementwise gradient of ``maximum``. At exact ties
  the gradient is shared among the tied inputs instead of going to one of them.
  """
  x = x[:, : x.shape[1] // 2 * 2, : x.shape[2] // 2 * 2]
  return jnp.maximum(
    jnp.maximum(x[:, 0::2, 0::2], x[:, 0::2, 1::2]), jnp.maximum(x[:, 1::2, 0::2], x[:, 1::2, 1::2])
  )


class CNN(nn.Module):
  """Two 3x3 conv + ReLU + 2x2 max-pool blocks, one hidden dense layer, linear head.

  Built from the tapped :class:`Conv` / :class:`Dense`; same function and parameter tree as
  :class:`FlaxCNN`. ReLU runs after the pool (relu(max(.)) = max(relu(.)), on 4x fewer values).
  """

  num_classes: int
  features: tuple[int, int] = (16, 32)
  hidden: int = 64

  @nn.compact
  def __call__(self, x: chex.Array) -> chex.Array:
    """x: float32 [batch, H, W, C] -> logits [batch, num_classes]."""
    for features in self.features:
      x = nn.relu(max_pool_2x2(Conv(features)(x)))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(Dense(self.hidden)(x))
    return Dense(self.num_classes)(x)


class FlaxCNN(nn.Module):
  """:class:`CNN` written with stock ``nn.Conv`` / ``nn.max_pool`` / ``nn.Dense``: the reference that
  tests and benchmarks hold the fast model against (per-example gradients only by vmap(grad))."""

  num_classes: int
  features: tuple[int, int] = (16, 32)
  hidden: int = 64

  @nn.compact
  def __call__(self, x: chex.Array) -> chex.Array:
    """x: float32 [batch, H, W, C] -> logits [batch, num_classes]."""
    for features in self.features:
      x = nn.max_pool(nn.relu(nn.Conv(features, (3, 3))(x)), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


class LogisticRegression(nn.Module):
  """Multinomial logistic regression: logits = W vec(x) + b."""

  num_classes: int

  @nn.compact
  def __call__(self, x: chex.Array) -> chex.Array:
    """x: float32 [batch, H, W, C] -> logits [batch, num_classes]."""
    return Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def _check_input(input_shape: Sequence[int], num_classes: int) -> None:
  require(
    len(input_shape) == 3 and all(isinstance(d, numbers.Integral) and d >= 1 for d in input_shape),
    f"input_shape={tuple(input_shape)!r} is invalid: expected (H, W, C) with positive integers",
  )
  check_int("num_classes", num_classes, minimum=2)


def make_model(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
  """The model of ``cfg.name`` ('cnn' | 'logreg') for images of ``input_shape`` = (H, W, C).

  Raises:
    ConfigError if the shape is not (H, W, C), num_classes < 2, or a CNN's H or W is below 4 (two pools).
  """
  _check_input(input_shape, num_classes)
  if cfg.name == "logreg":
    return LogisticRegression(num_classes)
  require(
    min(input_shape[:2]) >= 4,
    f"input_shape={tuple(input_shape)!r} is invalid for model='cnn': expected H, W >= 4",
  )
  return CNN(num_classes)


def init_params(model: nn.Module, key: chex.PRNGKey, input_shape: Sequence[int]) -> chex.ArrayTree:
  """The model's initial ``params`` collection, traced on one dummy example of ``input_shape``."""
  return model.init(key, jnp.zeros((1, *input_shape), jnp.float32))["params"]


def normalize_pixels(x: chex.Array) -> chex.Array:
  """uint8 pixels -> float32 x / 255 in [0, 1]."""
  return jnp.asarray(x, jnp.float32) / 255.0


def cross_entropy(logits: chex.Array, labels: chex.Array) -> chex.Array:
  """Softmax cross-entropy -log softmax(logits)[y] per example: [batch, K], [batch] -> [batch]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_loss_fn(apply_fn: ApplyFn) -> LossFn:
  """loss(params, x [batch, H, W, C] float32, y [batch] int32) -> per-example cross-entropy [batch]."""

  def loss_fn(params: chex.ArrayTree, x: chex.Array, y: chex.Array) -> chex.Array:
    return cross_entropy(apply_fn({"params": params}, x), y)

  return loss_fn
