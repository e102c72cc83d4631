"""Models: a small flax CNN for EMNIST/CIFAR-10 and multinomial logistic regression.

Every model maps float32 images [batch, H, W, C] in [0, 1] (see :func:`normalize_pixels`) to logits
[batch, num_classes]. Functions that train or evaluate take ``apply_fn = model.apply`` (flax convention
``apply_fn({"params": params}, x)``) so they stay independent of the architecture. No normalization
layers: batch statistics would couple examples and break per-example DP-SGD.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import chex
import flax.linen as nn
import jax.numpy as jnp
import optax

from fcfn_jax.config import ModelConfig, check_int, require

ApplyFn = Callable[..., chex.Array]
LossFn = Callable[[chex.ArrayTree, chex.Array, chex.Array], chex.Array]


class CNN(nn.Module):
  """Two 3x3 conv + ReLU + 2x2 max-pool blocks, one hidden dense layer, linear head."""

  num_classes: int
  features: tuple[int, int] = (16, 32)
  hidden: int = 64

  @nn.compact
  def __call__(self, x: chex.Array) -> chex.Array:
    """x: float32 [batch, H, W, C] -> logits [batch, num_classes]."""
    for features in self.features:
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


class LogisticRegression(nn.Module):
  """Multinomial logistic regression: logits = W vec(x) + b."""

  num_classes: int

  @nn.compact
  def __call__(self, x: chex.Array) -> chex.Array:
    """x: float32 [batch, H, W, C] -> logits [batch, num_classes]."""
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def _check_input(input_shape: Sequence[int], num_classes: int) -> None:
  require(len(input_shape) == 3 and all(isinstance(d, numbers.Integral) and d >= 1 for d in input_shape),
          f"input_shape={tuple(input_shape)!r} is invalid: expected (H, W, C) with positive integers")
  check_int("num_classes", num_classes, minimum=2)


def make_model(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> nn.Module:
  """The model of ``cfg.name`` ('cnn' | 'logreg') for images of ``input_shape`` = (H, W, C).

  Raises:
    ConfigError if the shape is not (H, W, C), num_classes < 2, or a CNN's H or W is below 4 (two pools).
  """
  _check_input(input_shape, num_classes)
  if cfg.name == "logreg":
    return LogisticRegression(num_classes)
  require(min(input_shape[:2]) >= 4,
          f"input_shape={tuple(input_shape)!r} is invalid for model='cnn': expected H, W >= 4")
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
