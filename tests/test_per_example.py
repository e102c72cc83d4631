"""Fast per-example clipping: the tapped CNN and the tapped clipped sum against the vmap(grad) reference."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax import federated, models
from fcfn_jax.config import FederatedConfig, PrivacyConfig
from fcfn_jax.data import ClientPool
from fcfn_jax.privacy import clipping

BATCH = 6
MASK = jnp.array([True, True, False, True, True, False])


def _batch(shape, classes, seed=1):
  """x [BATCH, *shape] with varied scales (so varied gradient norms), labels [BATCH]."""
  scales = jnp.array([0.02, 3.0, 1.0, 0.05, 5.0, 1.0]).reshape(-1, 1, 1, 1)
  x = scales * jax.random.uniform(jax.random.key(seed), (BATCH, *shape))
  return x, jnp.arange(BATCH) % classes


@functools.cache
def _params(model, shape):
  """Initial params, cached: eager flax init compiles many small XLA programs (seconds on a busy CPU)."""
  return models.init_params(model, jax.random.key(0), shape)


def _reference(apply_fn) -> clipping.ClippedSumFn:
  return clipping.vmap_clipped_sum(clipping.per_example_value_and_grad(models.make_loss_fn(apply_fn)))


def _clipped_sums(fast_fn, reference_fn, params, x, y):
  """Both ClippedSumFns (one jitted program) at C = the median valid per-example gradient norm, so some
  examples are clipped and some are not."""
  both = jax.jit(lambda clip: (fast_fn(params, x, y, MASK, clip), reference_fn(params, x, y, MASK, clip)))
  clip = float(np.median(np.asarray(both(1.0)[1].norms)[np.asarray(MASK)]))
  return both(clip)


# ----------------------------------------------------------------------------------------------------------
# The model: im2col convolution, pooling, parameter tree.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kernel_size",
  [(3, 3), pytest.param((5, 5), marks=pytest.mark.slow), pytest.param((2, 3), marks=pytest.mark.slow)],
)
def test_conv_patches_matmul_is_same_convolution(kernel_size):
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
  kernel = jax.random.normal(jax.random.key(1), (*kernel_size, 3, 4))
  patches = models.conv_patches(x, kernel_size)
  chex.assert_shape(patches, (2, 7, 6, kernel_size[0] * kernel_size[1] * 3))
  expected = jax.lax.conv_general_dilated(
    x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  chex.assert_trees_all_close(patches @ kernel.reshape(-1, 4), expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 6, 2), (7, 5, 1)])
def test_max_pool_matches_flax(shape):
  x = jax.random.normal(jax.random.key(0), (3, *shape))
  chex.assert_trees_all_equal(models.max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))


def test_cnn_has_the_flax_cnn_params():
  shape = (28, 28, 1)
  chex.assert_trees_all_equal(_params(models.CNN(10), shape), _params(models.FlaxCNN(10), shape))


@pytest.mark.parametrize(
  "shape,classes", [((28, 28, 1), 10), pytest.param((10, 7, 2), 4, marks=pytest.mark.slow)]
)
def test_cnn_is_the_flax_cnn(shape, classes):
  """The same function as stock nn.Conv / nn.max_pool (odd sizes: the pool drops the last row/column)."""
  fast, reference = models.CNN(classes), models.FlaxCNN(classes)
  params = _params(fast, shape)
  x = jax.random.uniform(jax.random.key(1), (4, *shape))
  outputs = jax.jit(lambda p: (fast.apply({"params": p}, x), reference.apply({"params": p}, x)))(params)
  chex.assert_trees_all_close(*outputs, atol=1e-5)


@pytest.mark.slow  # test_tapped_clipped_sum_equals_vmap_grad[logreg] and the chosen path stay in CI
def test_fully_tapped_models():
  x = jnp.zeros((2, 8, 8, 1))
  for model, tapped in (
    (models.CNN(3), True),
    (models.LogisticRegression(3), True),
    (models.FlaxCNN(3), False),
  ):
    params = _params(model, x.shape[1:])
    assert clipping.is_fully_tapped(model.apply, params, x) == tapped, type(model).__name__


# ----------------------------------------------------------------------------------------------------------
# The clipped sum.
# ----------------------------------------------------------------------------------------------------------

# For the second conv, 4x4 inputs (T = 4 positions after the pool) make the ghost norm the cheaper
# choice and 12x12 ones (T = 36) the materialized per-example kernel gradient; dense layers always take
# the ghost norm.
CASES = [
  pytest.param(
    models.CNN(5, features=(4, 8), hidden=16), (4, 4, 1), id="cnn-ghost-conv", marks=pytest.mark.slow
  ),
  pytest.param(
    models.CNN(5, features=(4, 8), hidden=16), (12, 12, 3), id="cnn-materialized-conv", marks=pytest.mark.slow
  ),
  pytest.param(models.LogisticRegression(10), (28, 28, 1), id="logreg"),
]


@pytest.mark.parametrize("model,shape", CASES)
def test_tapped_clipped_sum_equals_vmap_grad(model, shape):
  params = _params(model, shape)
  x, y = _batch(shape, model.num_classes)
  fast, reference = _clipped_sums(
    clipping.tapped_clipped_sum(model.apply), _reference(model.apply), params, x, y
  )
  chex.assert_trees_all_close(fast, reference, rtol=1e-5, atol=1e-6)


def test_tapped_norms_are_per_example_gradient_norms():
  model, shape = models.CNN(5, features=(4, 8), hidden=16), (12, 12, 1)
  params = _params(model, shape)
  x, y = _batch(shape, 5)

  def norms():
    _, grads = clipping.per_example_value_and_grad(models.make_loss_fn(model.apply))(params, x, y)
    taps = clipping.tap_gradients(model.apply, params, x, y, MASK)[1]
    return clipping.tapped_norms(taps), jnp.where(MASK, clipping.per_example_norms(grads), 0.0)

  chex.assert_trees_all_close(*jax.jit(norms)(), rtol=1e-5)


def test_chosen_path_equals_flax_reference():
  """The default for the EMNIST CNN (tapped im2col CNN) == vmap(grad) through the stock flax CNN."""
  shape = (28, 28, 1)
  params = _params(models.CNN(10), shape)
  x, y = _batch(shape, 10)
  fast, reference = _clipped_sums(
    clipping.make_clipped_sum_fn(models.CNN(10).apply),
    clipping.make_clipped_sum_fn(models.FlaxCNN(10).apply),
    params,
    x,
    y,
  )
  chex.assert_trees_all_close(fast, reference, rtol=1e-5, atol=1e-6)


def test_masked_slots_contribute_exactly_nothing():
  model, shape = models.CNN(5, features=(4, 8), hidden=16), (12, 12, 1)
  params = _params(model, shape)
  x, y = _batch(shape, 5)
  fill = jnp.array([0.0, 0.0, jnp.nan, 0.0, 0.0, 1e6]).reshape(-1, 1, 1, 1)
  dirty_x, dirty_y = jnp.where(MASK.reshape(-1, 1, 1, 1), x, fill), jnp.where(MASK, y, 4 - y)
  fn = jax.jit(clipping.tapped_clipped_sum(model.apply))
  clean, dirty = fn(params, x, y, MASK, 1.0), fn(params, dirty_x, dirty_y, MASK, 1.0)
  chex.assert_trees_all_equal(clean, dirty)
  np.testing.assert_array_equal(np.asarray(dirty.norms)[~np.asarray(MASK)], 0.0)
  np.testing.assert_array_equal(np.asarray(dirty.losses)[~np.asarray(MASK)], 0.0)


@pytest.mark.slow  # tests/test_federated.py runs the vmapped DP round against a per-client loop
def test_vmapped_over_clients_with_noise():
  """dp_gradient per client (vmapped, noise on, per-client z) is the same with either ClippedSumFn."""
  model, shape, clients = models.CNN(5, features=(4, 8), hidden=16), (8, 8, 1), 3
  params = _params(model, shape)
  x = jax.random.uniform(jax.random.key(2), (clients, BATCH, *shape))
  y = jnp.broadcast_to(jnp.arange(BATCH) % 5, (clients, BATCH))
  masks = jnp.stack([MASK, jnp.ones(BATCH, bool), ~MASK])
  z, keys = jnp.array([0.5, 1.0, 2.0]), jax.random.split(jax.random.key(3), clients)

  def per_client(clipped_sum_fn):
    return jax.vmap(lambda *a: clipping.dp_gradient(clipped_sum_fn, params, *a, 1.0, 3.0))(
      x, y, masks, z, keys
    )

  fast, reference = jax.jit(
    lambda: (per_client(clipping.make_clipped_sum_fn(model.apply)), per_client(_reference(model.apply)))
  )()
  chex.assert_trees_all_close(fast, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # two DP-round compilations, one through vmap(grad) of grouped convolutions (~30 s)
def test_round_equals_flax_reference_round():
  """A whole DP round (noise on) with the tapped CNN == the round with the stock flax CNN."""
  shape, classes, clients = (12, 12, 1), 4, 5
  rng = np.random.default_rng(0)
  pool = ClientPool(
    rng.integers(0, 256, (clients, 10, *shape), dtype=np.uint8),
    rng.integers(0, classes, (clients, 10)).astype(np.int32),
    np.array([10, 4, 7, 0, 10], np.int32),
  )
  fed = FederatedConfig(local_steps=2, batch_size=4, client_lr=0.3, chunk_size=2)
  params = _params(models.CNN(classes), shape)
  state = federated.init_server_state(params, fed)
  rounds = [
    federated.federated_round(
      state,
      pool,
      jnp.full(clients, 0.8),
      jnp.ones(clients),
      jax.random.key(1),
      apply_fn=model.apply,
      fed=fed,
      privacy=PrivacyConfig(clip_norm=0.5),
    )
    for model in (models.CNN(classes), models.FlaxCNN(classes))
  ]
  chex.assert_trees_all_close(rounds[0], rounds[1], rtol=1e-5, atol=1e-6)
