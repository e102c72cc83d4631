"""Empirical privacy audit of one client's DP-SGD round: claimed epsilon vs a 95% epsilon lower bound.

For each claimed budget eps, the noise multiplier z is calibrated (events.dp_event: the configured
sampler, Poisson by default) for one round of S = --local_steps steps of a client holding the first
--client_examples examples of client 0, at sampling rate q = min(1, batch_size / client_examples);
``fcfn_jax.attacks.audit.audit_client`` then runs --trials real rounds without and with the canary (added
for Poisson, replacing an example for fixed-size batches) and turns the best canary test into an epsilon
lower bound. Two controls show the audit's power: no noise at all, and a client that adds
1/--under_noise_factor of the noise its smallest claim needs.

Outputs in --out (written whole at the end): audit.{csv,json,md} and manifest.json. Example (offline, a
couple of minutes on CPU):

  python scripts/privacy_audit.py --epsilons=1,2,4,8 --trials=5000 --out=results/audit
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from absl import flags

from fcfn_jax import config as fc
from fcfn_jax import data, models, report, validate
from fcfn_jax.attacks import audit
from fcfn_jax.privacy import calibration, events, ledger

import sim_flags

# One client's DP-SGD round: no game, no checkpoints.
SIM = sim_flags.ConfigFlags(fc.SimulationConfig, skip=("game", "checkpoint_dir", "checkpoint_every"))
RUN = sim_flags.ConfigFlags(fc.RunConfig, skip=sim_flags.CHECKPOINT_FLAGS)
EPSILONS = sim_flags.define_list(
  "epsilons", [1, 2, 4, 8], sim_flags.number(validate.check_positive), "Claimed budgets to audit (> 0)."
)
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
  epsilons = EPSILONS.value
  validate.require(
    FLAGS.under_noise_factor > 1,
    f"under_noise_factor={FLAGS.under_noise_factor!r} is invalid: expected a number > 1",
  )
  validate.check_open_unit("confidence", FLAGS.confidence)
  validate.check_int("trials", FLAGS.trials, minimum=4)
  validate.check_int("trial_chunk", FLAGS.trial_chunk)
  validate.check_int("canary_pixels", FLAGS.canary_pixels)
  validate.check_int("canary_label", FLAGS.canary_label, minimum=0)
  validate.check_int("client_examples", FLAGS.client_examples, minimum=2)
  return epsilons, SIM.value()


def main(argv):
  del argv
  run_cfg = sim_flags.run_config(RUN)
  epsilons, cfg = _settings()
  fed, privacy = cfg.federated, cfg.privacy
  steps, delta, n = fed.local_steps, privacy.delta, FLAGS.client_examples
  fd = data.load_federated(cfg.data)
  validate.require(
    fd.pool.num_examples[0] >= n,
    f"client_examples={n} is invalid: client 0 has {fd.pool.num_examples[0]} examples",
  )
  sampler = events.sampler_of(fed, privacy)
  validate.check_int("canary_label", FLAGS.canary_label, minimum=0, maximum=fd.num_classes - 1)
  x, y = fd.pool.x[0, :n], fd.pool.y[0, :n]
  canary = audit.make_canary(x, FLAGS.canary_label, FLAGS.canary_pixels)
  with validate.reraise(validate.ConfigError, lambda e: f"epsilons={epsilons} is invalid: {e}"):
    claimed_noise = calibration.calibrate_noise_multipliers(
      np.asarray(epsilons), n, steps, delta, sampler, privacy.accountant
    )
  model = models.make_model(cfg.model, fd.input_shape, fd.num_classes)
  key = jax.random.key(cfg.seed)
  params = models.init_params(model, jax.random.fold_in(key, 0), fd.input_shape)
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
  setup = _setup(cfg, n)
  header = (
    f"{cfg.data.dataset} ({cfg.data.source}) client 0: {n} examples + canary, model {cfg.model.name}, "
    f"{steps} DP-SGD steps ({sampler.kind}, q={min(1.0, fed.batch_size / n):.3g}, B_max={sampler.capacity}), "
    f"C={privacy.clip_norm:g}, delta={delta:g}, eps_accountant by {_tightest(sampler)}; "
    f"{FLAGS.confidence:.0%} lower bounds from {FLAGS.trials} rounds per side for claims {epsilons}"
  )
  with sim_flags.results(run_cfg, header, {"setup": setup, "config": dataclasses.asdict(cfg)}) as out:
    rows = _audit(runs, params, x, y, canary, model, key, cfg)
    out.table("audit", rows, COLUMNS, {"setup": setup})
  print(report.format_table(rows, COLUMNS))
  print(f"\nwrote {run_cfg.out}/: audit.{{csv,json,md}}, manifest.json")


def _setup(cfg: fc.SimulationConfig, n: int) -> dict:
  """What the audit table's JSON records about the run."""
  fed, privacy = cfg.federated, cfg.privacy
  return {
    "dataset": cfg.data.dataset,
    "source": cfg.data.source,
    "model": cfg.model.name,
    "client_examples": n,
    "batch_size": fed.batch_size,
    "sampling_rate": float(events.sampling_rates(np.int64(n), fed.batch_size)),
    "sampler": privacy.sampling,
    "batch_capacity": events.sampler_of(fed, privacy).capacity,
    "eps_accountant": _tightest(events.sampler_of(fed, privacy)),
    "local_steps": fed.local_steps,
    "client_lr": fed.client_lr,
    "clip_norm": privacy.clip_norm,
    "delta": privacy.delta,
    "accountant": privacy.accountant,
    "trials_per_side": FLAGS.trials,
    "confidence": FLAGS.confidence,
    "canary_pixels": FLAGS.canary_pixels,
    "canary_label": FLAGS.canary_label,
    "seed": cfg.seed,
  }


def _tightest(sampler: events.Sampler) -> str:
  """The tightest accountant dp-accounting has for the sampler (PLD models Poisson truncation exactly)."""
  return "pld" if sampler.kind == "poisson" else "rdp"


def _audit(runs, params, x, y, canary, model, key, cfg) -> list[dict]:
  """One row per (run, claimed eps, noise multiplier z): audit_client's lower bound and the epsilon of the
  tightest accountant for the sampler."""
  fed, privacy = cfg.federated, cfg.privacy
  steps, delta, n = fed.local_steps, privacy.delta, x.shape[0]
  sampler = events.sampler_of(fed, privacy)
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
    tight = _tightest(sampler)
    eps_tight = ledger.accountant_epsilon(z, n, steps, delta, sampler, tight) if z > 0 else math.inf
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

  return rows


if __name__ == "__main__":
  sim_flags.run(main)
