"""Empirical privacy audit of one client's DP-SGD round: claimed epsilon vs a 95% epsilon lower bound.

For each claimed budget eps, the noise multiplier z is calibrated (accounting.dp_event: the configured
sampler, Poisson by default) for one round of S = --local_steps steps of a client holding the first
--client_examples examples of client 0, at sampling rate q = min(1, batch_size / client_examples);
``fcfn_jax.attacks.audit.audit_client`` then runs --trials real rounds without and with the canary (added
for Poisson, replacing an example for fixed-size batches) and turns the best canary test into an epsilon
lower bound. Two controls show the audit's power: no noise at all, and a client that adds
1/--under_noise_factor of the noise its smallest claim needs.

Outputs in --out: audit.{csv,json,md}. Example (offline, a couple of minutes on CPU):

  python scripts/privacy_audit.py --epsilons=1,2,4,8 --trials=5000 --out=results/audit
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from absl import app, flags

from fcfn_jax import config as fc
from fcfn_jax import data, models, report, validate
from fcfn_jax.attacks import audit
from fcfn_jax.privacy import accounting

import sim_flags

flags.DEFINE_list("epsilons", ["1", "2", "4", "8"], "Claimed budgets to audit (> 0).")
flags.DEFINE_integer("trials", 5000, "Rounds per membership (half select the threshold, half evaluate).")
flags.DEFINE_integer("canary_pixels", 40, "Pixels the canary lights (those the client uses least).")
flags.DEFINE_integer("canary_label", 0, "The canary's label.")
flags.DEFINE_float("confidence", 0.95, "Confidence of the lower bound, in (0, 1).")
flags.DEFINE_float("under_noise_factor", 8.0, "The under-noised control adds 1/factor of the noise (> 1).")
flags.DEFINE_integer("trial_chunk", 64, "Rounds per vectorized chunk (memory/speed trade-off).")
flags.DEFINE_integer(
  "client_examples",
  128,
  "Examples n of the audited client (client 0's first n): q = min(1, batch_size / n); n < batch_size "
  "audits full batches (q = 1).",
)
FLAGS = flags.FLAGS
FLAGS.set_default("model", "logreg")
FLAGS.set_default("out", "results/privacy_audit")

COLUMNS = (
  "run",
  "eps_claimed",
  "noise_multiplier",
  "eps_accountant",
  "eps_lower",
  "tpr",
  "fpr",
  "tpr_low",
  "fpr_high",
  "trials",
  "wall_time_s",
)


def _settings() -> tuple[list[float], fc.SimulationConfig]:
  """The claimed budgets and the config the flags describe; raises ConfigError naming a bad flag."""
  epsilons = sim_flags.positive_floats("epsilons", FLAGS.epsilons)
  validate.require(
    FLAGS.under_noise_factor > 1,
    f"under_noise_factor={FLAGS.under_noise_factor!r} is invalid: expected a number > 1",
  )
  validate.check_open_unit("confidence", FLAGS.confidence)
  validate.check_int("trials", FLAGS.trials, minimum=4)
  # Any mechanism: only the data, model, privacy and schedule parts of the config are used.
  cfg = sim_flags.simulation_config("stackelberg")
  validate.check_int("client_examples", FLAGS.client_examples, minimum=2)
  return epsilons, cfg


def main(argv):
  del argv
  epsilons, cfg = sim_flags.config_or_exit(_settings)
  fed, privacy = cfg.federated, cfg.privacy
  steps, delta, n = fed.local_steps, privacy.delta, FLAGS.client_examples
  fd = sim_flags.config_or_exit(lambda: data.load_federated(cfg.data))
  sim_flags.config_or_exit(
    lambda: validate.require(
      fd.pool.num_examples[0] >= n,
      f"client_examples={n} is invalid: client 0 has {fd.pool.num_examples[0]} examples",
    )
  )
  sampler = accounting.sampler_of(fed, privacy)
  # The tightest accountant dp-accounting has for the sampler (PLD models Poisson truncation exactly).
  tight = "pld" if sampler.kind == "poisson" else "rdp"
  x, y = fd.pool.x[0, :n], fd.pool.y[0, :n]
  canary = sim_flags.config_or_exit(lambda: audit.make_canary(x, FLAGS.canary_label, FLAGS.canary_pixels))
  model = models.make_model(cfg.model, fd.input_shape, fd.num_classes)
  key = jax.random.key(cfg.seed)
  params = models.init_params(model, jax.random.fold_in(key, 0), fd.input_shape)
  claimed_noise = sim_flags.config_or_exit(
    lambda: accounting.calibrate_noise_multipliers(
      np.asarray(epsilons), n, steps, delta, sampler, privacy.accountant
    )
  )
  smallest = int(np.argmin(epsilons))
  runs = [("private", eps, float(z)) for eps, z in zip(epsilons, claimed_noise)]
  runs += [
    ("no_noise", math.inf, 0.0),
    (
      f"noise/{FLAGS.under_noise_factor:g}",
      epsilons[smallest],
      float(claimed_noise[smallest]) / FLAGS.under_noise_factor,
    ),
  ]

  rows = []
  for i, (run, eps, z) in enumerate(runs):
    with report.Timer() as timer:
      result = audit.audit_client(
        params,
        x,
        y,
        canary,
        z,
        jax.random.fold_in(key, i + 1),
        apply_fn=model.apply,
        fed=fed,
        privacy=privacy,
        num_trials=FLAGS.trials,
        confidence=FLAGS.confidence,
        chunk_size=FLAGS.trial_chunk,
      )
    eps_tight = accounting.accountant_epsilon(z, n, steps, delta, sampler, tight) if z > 0 else math.inf
    rows.append(
      {
        "run": run,
        "eps_claimed": eps,
        "noise_multiplier": z,
        "eps_accountant": eps_tight,
        **{k: v for k, v in result._asdict().items() if k in COLUMNS},
        "wall_time_s": timer.elapsed,
      }
    )
    print(f"{run}: eps_claimed={eps:g} z={z:.4g} eps_lower={result.eps_lower:.3f} ({timer.elapsed:.1f}s)")

  os.makedirs(FLAGS.out, exist_ok=True)
  setup = {
    "dataset": cfg.data.dataset,
    "source": cfg.data.source,
    "model": cfg.model.name,
    "client_examples": n,
    "batch_size": fed.batch_size,
    "sampling_rate": float(accounting.sampling_rates(np.int64(n), fed.batch_size)),
    "sampler": sampler.kind,
    "batch_capacity": sampler.capacity,
    "eps_accountant": tight,
    "local_steps": steps,
    "client_lr": fed.client_lr,
    "clip_norm": privacy.clip_norm,
    "delta": delta,
    "accountant": privacy.accountant,
    "trials_per_side": FLAGS.trials,
    "confidence": FLAGS.confidence,
    "canary_pixels": FLAGS.canary_pixels,
    "canary_label": FLAGS.canary_label,
    "seed": cfg.seed,
  }
  report.write_results(FLAGS.out, "audit", rows, COLUMNS, {"setup": setup})
  print(
    f"\n{cfg.data.dataset} ({cfg.data.source}) client 0: {n} examples + canary, model {cfg.model.name}, "
    f"{steps} DP-SGD steps ({sampler.kind}, q={min(1.0, fed.batch_size / n):.3g}, B_max={sampler.capacity}), "
    f"C={privacy.clip_norm:g}, delta={delta:g}, eps_accountant by {tight}; "
    f"{FLAGS.confidence:.0%} lower bounds from {FLAGS.trials} rounds per side"
  )
  print(report.format_table(rows, COLUMNS))
  print(f"\nwrote {FLAGS.out}/audit.{{csv,json,md}}")


if __name__ == "__main__":
  app.run(main, flags_parser=sim_flags.parse_flags)
