"""bench_round.py's 'accountant' table: the traced accountant at the integer orders vs dp-accounting's
default orders (value, gradient), and its inverse traced_noise_multiplier."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from fcfn_jax.privacy import traced

from common import jit_case, measure

FLAGS = flags.FLAGS  # defined in bench_round.py

# ----------------------------------------------------------------------------------------------------------
# Table: the traced accountant, integer orders vs dp-accounting's orders.
# ----------------------------------------------------------------------------------------------------------


INTEGER_ORDERS = "integer orders 2..63, 128, 256"  # the 'orders' column's two values
DEFAULT_ORDERS = "dp-accounting's default orders"


def accountant_table(repeats: int) -> list[dict[str, Any]]:
  clients, steps, delta = FLAGS.accountant_clients, 100.0, 1e-5
  rng = np.random.default_rng(0)
  z = jnp.asarray(np.exp(rng.uniform(np.log(0.5), np.log(20.0), clients)), jnp.float32)
  q = jnp.asarray(10 ** rng.uniform(-3, 0, clients), jnp.float32)
  eps = jnp.asarray(np.exp(rng.uniform(np.log(0.05), np.log(20.0), clients)), jnp.float32)

  def evaluation(orders):
    return lambda z, q: traced.traced_epsilon(z, q, steps, delta, orders)

  def gradient(orders):
    return jax.grad(lambda z, q: jnp.sum(traced.traced_epsilon(z, q, steps, delta, orders)))

  cases, labels = [], []
  for label, orders in (
    (INTEGER_ORDERS, traced.INTEGER_TRACED_ORDERS),
    (DEFAULT_ORDERS, traced.TRACED_ORDERS),
  ):
    cases += [
      jit_case(f"traced_epsilon, {label}", evaluation(orders), z, q),
      jit_case(f"grad traced_epsilon, {label}", gradient(orders), z, q),
    ]
    labels += [(label, "value"), (label, "gradient")]
  inverse = functools.partial(traced.traced_noise_multiplier, steps=steps, delta=delta)
  cases += [
    jit_case("traced_noise_multiplier (default orders)", inverse, eps, q),
    jit_case("grad traced_noise_multiplier", jax.grad(lambda e, q: jnp.sum(inverse(e, q))), eps, q),
  ]
  labels += [
    (DEFAULT_ORDERS, "inverse"),
    (DEFAULT_ORDERS, "inverse grad"),
  ]
  measured, _ = measure(cases, repeats)
  for row, (orders, what) in zip(measured, labels):
    row.update(orders=orders, what=what, clients=clients, us_per_client=1e6 * row["median_s"] / clients)
  row_of = {(row["orders"], row["what"]): row for row in measured}
  for what in ("value", "gradient"):
    after, before = row_of[(DEFAULT_ORDERS, what)], row_of[(INTEGER_ORDERS, what)]
    after["over_integer_orders"] = after["median_s"] / before["median_s"]
  print(
    f"accountant: {clients} clients, float32, z in [0.5, 20], q in [1e-3, 1], eps in [0.05, 20], "
    f"{steps:g} steps, delta = {delta}; {len(traced.INTEGER_TRACED_ORDERS)} vs "
    f"{len(traced.TRACED_ORDERS)} orders ({traced.FRACTIONAL_TERMS} terms per fractional series)"
  )
  return measured
