"""Gradient inversion: iDLG labels, the closed-form logistic regression inversion, DLG, and DP's effect."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax import data, models
from fcfn_jax.attacks import inversion
from fcfn_jax.config import PrivacyConfig
from fcfn_jax.privacy import calibration, events

SHAPE = (28, 28, 1)
CLASSES = 10
LOGREG = models.LogisticRegression(CLASSES)
CLEAN = PrivacyConfig(private=False)
PRIVATE = PrivacyConfig(clip_norm=1.0)


@functools.cache
def _digits():
  """The first 4 FEMNIST test digits of the embedded copy (distinct labels): uint8 [4, 28, 28, 1], [4]."""
  arrays = np.load(data.EMBEDDED_PATH)
  x, y = arrays["test_image"][:4], arrays["test_label"][:4].astype(np.int32)
  assert len(set(y.tolist())) == 4
  return x, y


def _params(model=LOGREG):
  return models.init_params(model, jax.random.key(0), SHAPE)


def _gradient(x, y, noise_multiplier=None, model=LOGREG, seed=3):
  """The server's view of one step: clean (noise_multiplier None) or DP-SGD with z (0 = clip only)."""
  privacy = CLEAN if noise_multiplier is None else PRIVATE
  return inversion.observed_gradient(
    _params(model),
    x,
    y,
    jnp.float32(noise_multiplier or 0.0),
    jax.random.key(seed),
    apply_fn=model.apply,
    privacy=privacy,
  )


def _attack(gradient, batch=1, model=LOGREG, clip_norm=None, **kwargs):
  labels = inversion.infer_labels(gradient, batch)
  return inversion.invert_gradient(
    _params(model),
    gradient,
    labels,
    jax.random.key(4),
    apply_fn=model.apply,
    input_shape=SHAPE,
    clip_norm=clip_norm,
    **kwargs,
  )


def test_psnr_and_mse_known_values():
  x = jnp.full((2, *SHAPE), 0.5)
  x_hat = x + jnp.array([0.1, 0.01]).reshape(2, 1, 1, 1)
  np.testing.assert_allclose(inversion.mse(x_hat, x), [1e-2, 1e-4], rtol=1e-4)
  np.testing.assert_allclose(inversion.psnr(x_hat, x), [20.0, 40.0], rtol=1e-4)


def test_match_reconstructions_undoes_a_permutation():
  x, _ = _digits()
  x = x.astype(np.float32) / 255
  perm = np.array([2, 0, 3, 1])
  noisy = x[perm] + 0.05 * np.random.default_rng(0).normal(size=x.shape)
  matched = inversion.match_reconstructions(noisy, x)
  np.testing.assert_array_equal(perm[matched], np.arange(4))


def test_observed_gradient_is_the_mean_gradient_or_its_noised_clip():
  x, y = _digits()
  loss_fn = models.make_loss_fn(LOGREG.apply)
  expected = jax.grad(lambda p: jnp.mean(loss_fn(p, models.normalize_pixels(x), y)))(_params())
  chex.assert_trees_all_close(_gradient(x, y), expected, atol=1e-6)
  # Same key, so the noise draws coincide: the difference is z C / B times standard normals.
  z = 0.7
  diff = jax.tree.map(jnp.subtract, _gradient(x, y, z), _gradient(x, y, 0.0))
  flat = np.concatenate([np.ravel(d) for d in jax.tree.leaves(diff)])
  np.testing.assert_allclose(flat.std(), z * PRIVATE.clip_norm / len(y), rtol=0.05)
  assert abs(flat.mean()) < 4 * flat.std() / np.sqrt(flat.size)


def test_idlg_infers_labels_from_clean_gradients():
  x, y = _digits()
  for j in range(len(y)):
    np.testing.assert_array_equal(
      inversion.infer_labels(_gradient(x[j : j + 1], y[j : j + 1]), 1), y[j : j + 1]
    )
  assert set(np.asarray(inversion.infer_labels(_gradient(x, y), len(y))).tolist()) == set(y.tolist())


def test_closed_form_logreg_inversion_is_exact():
  x, y = _digits()
  for j in range(len(y)):
    x_hat = inversion.logreg_inversion(_gradient(x[j : j + 1], y[j : j + 1]), SHAPE)
    np.testing.assert_allclose(x_hat, models.normalize_pixels(x[j : j + 1]), atol=1e-4)


@pytest.mark.parametrize("distance", inversion.DISTANCES)
def test_dlg_recovers_a_digit_from_a_clean_logreg_gradient(distance):
  x, y = _digits()
  target = models.normalize_pixels(x[:1])
  result = _attack(_gradient(x[:1], y[:1]), distance=distance)
  assert float(inversion.psnr(result.x, target)[0]) > 30.0
  assert result.distance[-1] < 1e-3 * result.distance[0]


def test_dlg_recovers_a_batch_of_distinct_labels():
  x, y = _digits()
  result = _attack(_gradient(x, y), batch=len(y), num_steps=1000)
  target = np.asarray(models.normalize_pixels(x))
  matched = inversion.match_reconstructions(np.asarray(result.x), target)
  assert np.all(np.asarray(inversion.psnr(result.x[matched], target)) > 30.0)


def test_dp_noise_defeats_the_attack():
  """DP-SGD noise at an equilibrium-sized budget leaves the attacker no better than a blank guess."""
  x, y = _digits()
  target = models.normalize_pixels(x[:1])
  blank = float(inversion.psnr(jnp.zeros_like(target), target)[0])
  # eps = 8 over 25 steps at sampling rate 1/8, as a client of a short federated run would spend it.
  z_eps8 = float(
    calibration.calibrate_noise_multipliers(8.0, 256, 25, 1e-5, events.Sampler("poisson", 32, 81))[0]
  )
  clean = float(inversion.psnr(_attack(_gradient(x[:1], y[:1])).x, target)[0])
  quality = {}
  for z in (0.005, 0.05, z_eps8):
    gradient = _gradient(x[:1], y[:1], z)
    quality[z] = float(inversion.psnr(_attack(gradient, clip_norm=PRIVATE.clip_norm).x, target)[0])
    analytic = float(inversion.psnr(inversion.logreg_inversion(gradient, SHAPE), target)[0])
    assert abs(analytic - quality[z]) < 3.0, (z, analytic, quality[z])  # DLG matches the closed form
  assert quality[0.005] > quality[0.05] > quality[z_eps8], quality
  assert quality[z_eps8] < min(15.0, blank + 1.0, clean - 20.0), (quality, blank, clean)


@pytest.mark.slow
def test_dlg_recovers_a_digit_from_a_clean_cnn_gradient():
  x, y = _digits()
  cnn = models.CNN(CLASSES)
  result = _attack(_gradient(x[:1], y[:1], model=cnn), model=cnn, distance="l2")
  np.testing.assert_array_equal(result.labels, y[:1])
  assert float(inversion.psnr(result.x, models.normalize_pixels(x[:1]))[0]) > 25.0
