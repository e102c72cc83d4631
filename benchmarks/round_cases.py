"""A federated round's inputs and cases, shared by bench_round.py's tables: the writers' setup, fixed-size
batches, one federated_round as a timed case, round 0's sampled batches, one local step's FLOPs."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from absl import flags

from fcfn_jax import data, federated, models
from fcfn_jax.config import DataConfig, FederatedConfig, PrivacyConfig
from fcfn_jax.privacy import clipping, events

from common import Case, flops_of, jit_case

FLAGS = flags.FLAGS  # defined in bench_round.py

CLIENT_LR = 0.1
CAPACITY = 64  # slots per client of the resampled logistic-regression pool


class Setup(NamedTuple):
  """A round's inputs: pool (on the device), per-client z and weights, key, configs, initial params."""

  pool: data.ClientPool
  z: jax.Array
  weights: jax.Array
  key: jax.Array
  fed: FederatedConfig
  num_classes: int
  input_shape: tuple[int, int, int]
  params: Any


def writer_setup(clients: int, steps: int, batch: int, chunk: int) -> Setup:
  """``clients`` FEMNIST writers of the embedded data, the EMNIST CNN's initial params."""
  fed_data = data.load_federated(DataConfig(num_clients=clients))
  params = models.init_params(models.CNN(fed_data.num_classes), jax.random.key(0), fed_data.input_shape)
  return Setup(
    jax.device_put(fed_data.pool),
    jnp.full(clients, FLAGS.noise_multiplier),
    jnp.ones(clients),
    jax.random.key(1),
    FederatedConfig(local_steps=steps, batch_size=batch, client_lr=CLIENT_LR, chunk_size=chunk),
    fed_data.num_classes,
    tuple(fed_data.input_shape),
    params,
  )


def fixed_batches(private: bool = True) -> PrivacyConfig:
  """The privacy config of the methods/overhead/chunks/loop tables: fixed-size batches of B, so they
  measure clipping and vectorization on exactly B examples per step as before issue 11; the 'sampling'
  table gives the default Poisson sampler's cost relative to them."""
  return PrivacyConfig(clip_norm=FLAGS.clip_norm, sampling="fixed", private=private)


def round_case(
  name: str, setup: Setup, model: Any, privacy: PrivacyConfig, fed: FederatedConfig | None = None
) -> Case:
  """Case of one federated_round; flops = clients x local steps x one local step's cost analysis."""
  fed = fed or setup.fed
  state = federated.init_server_state(setup.params, fed)
  slots = events.sampler_of(fed, privacy).capacity
  flops = setup.pool.y.shape[0] * fed.local_steps * step_flops(setup, model.apply, privacy.private, slots)
  return jit_case(
    name,
    functools.partial(federated.federated_round, apply_fn=model.apply, fed=fed, privacy=privacy),
    state,
    setup.pool,
    setup.z,
    setup.weights,
    setup.key,
    flops=flops,
  )


def sampled_batches(setup: Setup) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The examples round 0 samples with fixed-size batches: x [clients, S, B, H, W, C], y, mask [clients, S,
  B] (the round's keys). Fixed-size, so every method's table sees exactly B examples per step."""
  round_key = jax.random.fold_in(setup.key, 0)
  sampler = events.Sampler("fixed", setup.fed.batch_size, setup.fed.batch_size)

  def one(i):
    sample_key = jax.random.split(jax.random.fold_in(round_key, i))[0]
    return federated.sample_client_batches(
      sample_key,
      setup.pool.x[i],
      setup.pool.y[i],
      setup.pool.num_examples[i],
      jnp.float32(1.0),
      setup.fed.local_steps,
      sampler,
    )

  return jax.jit(jax.vmap(one))(jnp.arange(setup.pool.y.shape[0]))


def step_flops(setup: Setup, apply_fn: Any, private: bool, slots: int | None = None) -> float:
  """Cost-analysis FLOPs of one client's local step over ``slots`` (default B) slots (clipped sum + noise,
  or the mean gradient)."""
  shape = (slots or setup.fed.batch_size, *setup.input_shape)
  x, y, mask = jnp.zeros(shape), jnp.zeros(shape[0], jnp.int32), jnp.ones(shape[0], bool)
  loss_fn = models.make_loss_fn(apply_fn)
  if private:
    fn = lambda p: (
      clipping.dp_gradient(
        clipping.make_clipped_sum_fn(apply_fn),
        p,
        x,
        y,
        mask,
        FLAGS.noise_multiplier,
        jax.random.key(0),
        FLAGS.clip_norm,
        float(setup.fed.batch_size),
      ).grad
    )
  else:
    fn = lambda p: jax.grad(lambda q: jnp.mean(loss_fn(q, x, y)))(p)
  return flops_of(jax.jit(fn).lower(setup.params).compile())
