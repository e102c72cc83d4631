"""Re-export of the privacy maps' public names, for code written before the split (nothing in this repo
imports through it; import from the modules):

  events.py       the Sampler, dp_event (what dp-accounting accounts), overflow and the truncation charge
  surrogate.py    closed-form, conservative eps <-> z (jnp)
  traced.py       the traced RDP accountant, its implicit inverse, program_noise (jnp)
  ledger.py       dp-accounting's epsilon per client (host)
  calibration.py  dp-accounting's inverse eps -> z per client (host)
"""

from fcfn_jax.privacy.calibration import CALIBRATION_Z_RANGE, calibrate_noise_multipliers
from fcfn_jax.privacy.events import (
  CAPACITY_TAIL,
  ClientEvent,
  Sampler,
  default_capacity,
  dp_event,
  overflow_probability,
  sampler_of,
  sampling_rates,
)
from fcfn_jax.privacy.ledger import PLD_VALUE_DISCRETIZATION, accountant_epsilon, epsilon_spent
from fcfn_jax.privacy.surrogate import noise_variance, surrogate_epsilon, surrogate_noise_multiplier
from fcfn_jax.privacy.traced import (
  FRACTIONAL_TERMS,
  INTEGER_TRACED_ORDERS,
  TRACED_ORDERS,
  program_noise,
  traced_epsilon,
  traced_noise_multiplier,
  traced_rdp,
)

__all__ = [
  "CALIBRATION_Z_RANGE",
  "CAPACITY_TAIL",
  "FRACTIONAL_TERMS",
  "INTEGER_TRACED_ORDERS",
  "PLD_VALUE_DISCRETIZATION",
  "TRACED_ORDERS",
  "ClientEvent",
  "Sampler",
  "accountant_epsilon",
  "calibrate_noise_multipliers",
  "default_capacity",
  "dp_event",
  "epsilon_spent",
  "noise_variance",
  "overflow_probability",
  "program_noise",
  "sampler_of",
  "sampling_rates",
  "surrogate_epsilon",
  "surrogate_noise_multiplier",
  "traced_epsilon",
  "traced_noise_multiplier",
  "traced_rdp",
]
