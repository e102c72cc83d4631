"""Per-example clipping, masking and Gaussian noise of the DP-SGD gradient."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest

from fcfn_jax import models
from fcfn_jax.privacy import clipping

CLIP = 1.0
BATCH = 6
SHAPE = (4, 4, 1)


def _setup():
  """Logistic regression on 6 examples whose scales put some gradient norms below C, some above."""
  model = models.LogisticRegression(num_classes=3)
  params = models.init_params(model, jax.random.key(0), SHAPE)
  scales = jnp.array([0.05, 0.1, 3.0, 5.0, 0.2, 4.0]).reshape(-1, 1, 1, 1)
  x = scales * jax.random.normal(jax.random.key(1), (BATCH, *SHAPE))
  y = jnp.array([0, 1, 2, 0, 1, 2])
  loss_fn = models.make_loss_fn(model.apply)
  return loss_fn, params, x, y


class ClippingTest(chex.TestCase):
  def test_per_example_grads_match_single_example_grads(self):
    self._check_per_example_grads(cnn=False)

  @pytest.mark.slow  # the CNN compile; tests/test_per_example.py holds the CNN paths against vmap(grad)
  def test_per_example_grads_match_single_example_grads_cnn(self):
    self._check_per_example_grads(cnn=True)

  def _check_per_example_grads(self, cnn):
    loss_fn, params, x, y = _setup()
    if cnn:
      model = models.CNN(num_classes=3, features=(2, 3), hidden=4)
      loss_fn, params = models.make_loss_fn(model.apply), models.init_params(model, jax.random.key(0), SHAPE)
    losses, grads = jax.jit(clipping.per_example_value_and_grad(loss_fn))(params, x, y)
    chex.assert_shape(losses, (BATCH,))
    single_grad = jax.jit(jax.grad(lambda p, xj, yj: loss_fn(p, xj[None], yj[None])[0]))
    for j in range(BATCH):
      chex.assert_trees_all_close(
        jax.tree.map(lambda g, j=j: g[j], grads), single_grad(params, x[j], y[j]), atol=1e-6
      )
    chex.assert_trees_all_close(losses, loss_fn(params, x, y), atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_each_contribution_is_clipped_to_c(self):
    loss_fn, params, x, y = _setup()
    _, grads = clipping.per_example_value_and_grad(loss_fn)(params, x, y)
    # Row j of a one-hot mask isolates example j's clipped contribution.
    clip_one = self.variant(jax.vmap(clipping.clip_and_sum, in_axes=(None, 0, None)))
    contributions, norms = clip_one(grads, jnp.eye(BATCH, dtype=bool), CLIP)
    raw_norms = jnp.diagonal(norms)
    self.assertTrue(np.any(raw_norms < CLIP) and np.any(raw_norms > CLIP), "setup must hit both regimes")
    self.assertTrue(np.all(clipping.per_example_norms(contributions) <= CLIP * (1 + 1e-6)))
    scale = jnp.minimum(1.0, CLIP / raw_norms)
    expected = jax.tree.map(lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)), grads)
    chex.assert_trees_all_close(contributions, expected, rtol=1e-6, atol=1e-7)
    unclipped = np.asarray(raw_norms <= CLIP)
    chex.assert_trees_all_equal(
      jax.tree.map(lambda c: c[unclipped], contributions), jax.tree.map(lambda g: g[unclipped], grads)
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_masked_examples_contribute_exactly_nothing(self):
    loss_fn, params, x, y = _setup()
    mask = jnp.array([True, False, True, False, True, False])
    # Huge, NaN and ordinary replacement pixels in the padding slots.
    fill = jnp.array([0.0, 1e6, 0.0, jnp.nan, 0.0, -3.0]).reshape(-1, 1, 1, 1)
    garbage_x = jnp.where(mask.reshape(-1, 1, 1, 1), x, fill)
    garbage_y = jnp.where(mask, y, 2 - y)
    clipped_sum_fn = clipping.vmap_clipped_sum(clipping.per_example_value_and_grad(loss_fn))
    dp = self.variant(
      lambda xx, yy: clipping.dp_gradient(
        clipped_sum_fn, params, xx, yy, mask, 1.5, jax.random.key(3), CLIP, float(BATCH)
      )
    )
    clean, dirty = dp(x, y), dp(garbage_x, garbage_y)
    chex.assert_trees_all_equal(clean, dirty)
    chex.assert_tree_all_finite(dirty)
    np.testing.assert_array_equal(np.asarray(dirty.norms)[~np.asarray(mask)], 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_noise_free_gradient_is_clipped_sum_over_the_expected_batch(self):
    loss_fn, params, x, y = _setup()
    mask = jnp.array([True, True, True, False, False, False])
    per_example_fn = clipping.per_example_value_and_grad(loss_fn)
    clipped_sum_fn = clipping.vmap_clipped_sum(per_example_fn)
    out = self.variant(clipping.dp_gradient, static_argnums=0)(
      clipped_sum_fn, params, x, y, mask, 0.0, jax.random.key(0), CLIP, 4.5
    )
    summed, _ = clipping.clip_and_sum(per_example_fn(params, x, y)[1], mask, CLIP)
    # Divided by the expected batch size q n = 4.5, neither by the 3 valid examples nor by the 6 slots.
    chex.assert_trees_all_close(out.grad, jax.tree.map(lambda s: s / 4.5, summed), atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_blocked_clipped_sum_equals_one_block_and_runs_only_the_used_blocks(self):
    """Blocks of 1 and 4 slots (4 does not divide 6): the clipped sum, losses and norms of one call over all
    slots; a block runs iff it starts below ``used`` (counted by a callback in the branch): none at 0."""
    loss_fn, params, x, y = _setup()
    clipped_sum_fn = clipping.vmap_clipped_sum(clipping.per_example_value_and_grad(loss_fn))
    mask = jnp.arange(BATCH) < 4  # joined slots first, as the sampler puts them
    runs = []

    def load(slots):
      xs, ys = slots
      jax.debug.callback(lambda: runs.append(1))
      return xs, ys

    reference = jax.jit(clipped_sum_fn)(params, x, y, mask, CLIP)
    blocked_fn = self.variant(clipping.blocked_clipped_sum, static_argnums=(0, 2, 6, 8))
    for block in (1, 4):
      for used in (0, 3, BATCH):
        runs.clear()
        blocked = blocked_fn(clipped_sum_fn, params, load, (x, y), mask, CLIP, block, jnp.int32(used))
        jax.effects_barrier()
        self.assertEqual(len(runs), -(-used // block), (block, used))
        if used == 0:
          chex.assert_trees_all_equal(blocked.summed, jax.tree.map(jnp.zeros_like, params))
          np.testing.assert_array_equal(blocked.norms, 0.0)
        elif used == BATCH or block == 4:  # every joined slot is in a block that runs: exact
          chex.assert_trees_all_close(blocked, reference, atol=1e-6)
    # A head of slots that always runs in one call, then the blocks (all skipped at once when used <= head).
    for head, used in ((2, 4), (2, 1), (2, 0), (BATCH, 4)):
      runs.clear()
      blocked = blocked_fn(clipped_sum_fn, params, load, (x, y), mask, CLIP, 1, jnp.int32(used), head)
      jax.effects_barrier()
      self.assertEqual(len(runs), 1 + (used - head if head < BATCH and used > head else 0))
      if used >= 4:  # every joined slot is in the head or a block that runs: exact
        chex.assert_trees_all_close(blocked, reference, atol=1e-6)

  def test_privatize_is_dp_gradient_after_the_clipped_sum(self):
    loss_fn, params, x, y = _setup()
    mask = jnp.arange(BATCH) < 5
    clipped_sum_fn = clipping.vmap_clipped_sum(clipping.per_example_value_and_grad(loss_fn))
    out = clipping.dp_gradient(clipped_sum_fn, params, x, y, mask, 1.3, jax.random.key(2), CLIP, 4.0)
    summed = clipped_sum_fn(params, x, y, mask, CLIP).summed
    chex.assert_trees_all_equal(out.grad, clipping.privatize(summed, 1.3, jax.random.key(2), CLIP, 4.0))

  def test_noise_std_is_z_times_c_per_client(self):
    """Zero-signal batches: b * g~ is pure noise with std z C; z and b are vmapped per-client arrays."""
    params = {"w": jnp.zeros((100, 50)), "b": jnp.zeros((50,))}

    def zero_grads(p, x, y):
      del y
      return jnp.zeros(x.shape[0]), jax.tree.map(lambda q: jnp.zeros((x.shape[0], *q.shape)), p)

    def noisy_grad(z, key, expected):
      return clipping.dp_gradient(
        clipping.vmap_clipped_sum(zero_grads),
        params,
        jnp.zeros((BATCH, 1)),
        jnp.zeros(BATCH, jnp.int32),
        jnp.ones(BATCH, bool),
        z,
        key,
        2.0,
        expected,
      ).grad

    multipliers, expected = jnp.array([0.5, 1.0, 3.0]), jnp.array([6.0, 2.5, 40.0])
    grads = jax.jit(jax.vmap(noisy_grad))(multipliers, jax.random.split(jax.random.key(7), 3), expected)
    for c, z in enumerate(multipliers):
      noise = np.concatenate([np.ravel(leaf[c]) * float(expected[c]) for leaf in jax.tree.leaves(grads)])
      # 5050 coordinates: the sample std has relative standard error ~1 %; allow 5 %.
      np.testing.assert_allclose(noise.std(), float(z) * 2.0, rtol=0.05)
      self.assertLess(abs(noise.mean()), 0.1 * float(z) * 2.0)

  def test_noise_is_independent_across_leaves(self):
    tree = {"a": jnp.zeros(1000), "b": jnp.zeros(1000)}
    noisy = clipping.add_gaussian_noise(tree, jax.random.key(0), 1.0)
    self.assertLess(abs(np.corrcoef(noisy["a"], noisy["b"])[0, 1]), 0.15)


if __name__ == "__main__":
  absltest.main()
