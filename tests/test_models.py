"""Models: output shapes for EMNIST/CIFAR shapes, input validation, the loss."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax import models
from fcfn_jax.config import ModelConfig
from fcfn_jax.validate import ConfigError


# The CNN at 28x28 (~15 s of compile on CI) is also compiled by test_per_example.py::test_cnn_is_the_flax_cnn.
@pytest.mark.parametrize("name", [pytest.param("cnn", marks=pytest.mark.slow), "logreg"])
@pytest.mark.parametrize(
  "input_shape,num_classes",
  [
    pytest.param((28, 28, 1), 62, marks=pytest.mark.slow),
    ((28, 28, 1), 10),
    pytest.param((32, 32, 3), 10, marks=pytest.mark.slow),
  ],
)
def test_output_shape(name, input_shape, num_classes):
  model = models.make_model(ModelConfig(name), input_shape, num_classes)
  params = models.init_params(model, jax.random.key(0), input_shape)
  logits = model.apply({"params": params}, jnp.zeros((3, *input_shape)))
  chex.assert_shape(logits, (3, num_classes))
  chex.assert_tree_all_finite(logits)


def test_model_kinds():
  assert isinstance(models.make_model(ModelConfig("cnn"), (32, 32, 3), 10), models.CNN)
  assert isinstance(models.make_model(ModelConfig("logreg"), (32, 32, 3), 10), models.LogisticRegression)


@pytest.mark.parametrize(
  "name,input_shape,num_classes,match",
  [
    ("cnn", (28, 28), 10, "input_shape"),
    ("logreg", (28, 28, 0), 10, "input_shape"),
    ("logreg", (28, 28, 1), 1, "num_classes"),
    ("cnn", (2, 28, 1), 10, "H, W >= 4"),
  ],
)
def test_make_model_rejects_bad_input(name, input_shape, num_classes, match):
  with pytest.raises(ConfigError, match=match):
    models.make_model(ModelConfig(name), input_shape, num_classes)


def test_loss_is_per_example_cross_entropy():
  model = models.LogisticRegression(num_classes=4)
  x = jax.random.uniform(jax.random.key(1), (5, 3, 3, 1))
  y = jnp.array([0, 1, 2, 3, 1])
  params = models.init_params(model, jax.random.key(0), (3, 3, 1))
  logits = model.apply({"params": params}, x)
  expected = -jax.nn.log_softmax(logits)[jnp.arange(5), y]
  chex.assert_trees_all_close(models.make_loss_fn(model.apply)(params, x, y), expected, atol=1e-6)


def test_normalize_pixels():
  out = models.normalize_pixels(np.array([0, 51, 255], np.uint8))
  assert out.dtype == jnp.float32
  chex.assert_trees_all_close(out, jnp.array([0.0, 0.2, 1.0]), atol=1e-7)
