"""Gradient inversion (iDLG) of single-example updates: no noise vs DP-SGD noise at several budgets.

Each of --num_images examples of client 0 is one local step of batch 1 (the attacker's easiest case),
released clean or with the noise multiplier z that the client's budget eps implies for the whole run
(--rounds x --local_steps steps at sampling rate --batch_size / n_0, calibrated with --accountant). The
server infers the label from the output bias gradient and optimizes a dummy image to match the gradient.
For logistic regression the closed-form inversion is reported too, and so is the PSNR of a blank image,
the score of an attacker who learned nothing.

Outputs in --out (written whole at the end): inversion.{csv,json,md}, inversion.png (originals and
reconstructions) and manifest.json. Example:

  python scripts/gradient_inversion.py --epsilons=1,8,64,1000 --num_images=6 --out=results/inversion
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from fcfn_jax import config as fc
from fcfn_jax import data, models, plotting, report, validate
from fcfn_jax.attacks import inversion
from fcfn_jax.privacy import calibration, events

import sim_flags

SIM = sim_flags.ConfigFlags(fc.SimulationConfig, skip=("game", "checkpoint_dir", "checkpoint_every"))
RUN = sim_flags.ConfigFlags(fc.RunConfig, skip=sim_flags.CHECKPOINT_FLAGS)
EPSILONS = sim_flags.define_list(
  "epsilons",
  [1, 8, 64, 1000],
  sim_flags.number(validate.check_positive),
  "Client budgets whose DP-SGD noise is attacked (> 0).",
)
flags.DEFINE_integer("num_images", 6, "Examples of client 0 to reconstruct, one single-example step each.")
flags.DEFINE_integer("attack_steps", 500, "Adam iterations of the gradient-matching attack.")
flags.DEFINE_float("attack_lr", 0.05, "Adam step size on the dummy image.")
flags.DEFINE_enum("distance", "cosine", list(inversion.DISTANCES), "Gradient-matching distance.")
flags.DEFINE_float("tv_weight", 0.0, "Weight of the total-variation image prior (0 = plain DLG).")
flags.DEFINE_bool("oracle_labels", False, "Give the attacker the true labels instead of iDLG's inference.")
FLAGS = flags.FLAGS
FLAGS.set_default("model", "logreg")
FLAGS.set_default("out", "results/gradient_inversion")

COLUMNS = (
  "setting",
  "eps",
  "noise_multiplier",
  "psnr_mean",
  "psnr_min",
  "psnr_max",
  "mse_mean",
  "label_accuracy",
  "closed_form_psnr_mean",
  "blank_psnr_mean",
  "wall_time_s",
)


def _settings() -> tuple[list[float], fc.SimulationConfig]:
  """The budgets and the config the flags describe; raises ConfigError naming a bad flag."""
  epsilons = EPSILONS.value
  validate.check_int("num_images", FLAGS.num_images)
  validate.check_int("attack_steps", FLAGS.attack_steps)
  validate.check_positive("attack_lr", FLAGS.attack_lr)
  validate.check_nonnegative("tv_weight", FLAGS.tv_weight)
  return epsilons, SIM.value()


def main(argv):
  del argv
  run = sim_flags.run_config(RUN)
  epsilons, cfg = _settings()
  fed, privacy = cfg.federated, cfg.privacy
  fd = data.load_federated(cfg.data)
  n0 = int(fd.pool.num_examples[0])
  validate.require(
    FLAGS.num_images <= n0, f"num_images={FLAGS.num_images} is invalid: client 0 has {n0} examples"
  )
  sampling_rate, steps = min(1.0, fed.batch_size / n0), fed.rounds * fed.local_steps
  with validate.reraise(validate.ConfigError, lambda e: f"epsilons={epsilons} is invalid: {e}"):
    noise = calibration.calibrate_noise_multipliers(
      np.asarray(epsilons), n0, steps, privacy.delta, events.sampler_of(fed, privacy), privacy.accountant
    )
  settings = [("no noise", math.inf, None)] + [(f"eps={e:g}", e, float(z)) for e, z in zip(epsilons, noise)]
  header = (
    f"{cfg.data.dataset} ({cfg.data.source}) client 0 ({n0} examples), {FLAGS.num_images} images, model "
    f"{cfg.model.name}; noise for eps {epsilons} over {steps} steps at q={sampling_rate:.3g}, "
    f"C={privacy.clip_norm:g}, delta={privacy.delta:g}"
  )
  with sim_flags.results(run, header, dataclasses.asdict(cfg)) as out:
    rows, originals, images, per_image = _attack(cfg, fd, settings)
    setup = _setup(cfg, fd, sampling_rate, steps)
    out.table("inversion", rows, COLUMNS, {"setup": setup, "psnr_per_image": per_image})
    plotting.reconstructions(originals, images, out.file("inversion.png"))
  print(report.format_table(rows, COLUMNS))
  print(f"\nwrote {run.out}/: inversion.{{csv,json,md,png}}, manifest.json")


def _setup(cfg: fc.SimulationConfig, fd: data.FederatedData, sampling_rate: float, steps: int) -> dict:
  """What the inversion table's JSON records about the run."""
  return {
    "dataset": cfg.data.dataset,
    "source": cfg.data.source,
    "model": cfg.model.name,
    "num_images": FLAGS.num_images,
    "labels": fd.pool.y[0, : FLAGS.num_images],
    "sampling_rate": sampling_rate,
    "steps": steps,
    "clip_norm": cfg.privacy.clip_norm,
    "delta": cfg.privacy.delta,
    "accountant": cfg.privacy.accountant,
    "attack_steps": FLAGS.attack_steps,
    "attack_lr": FLAGS.attack_lr,
    "distance": FLAGS.distance,
    "tv_weight": FLAGS.tv_weight,
    "oracle_labels": FLAGS.oracle_labels,
    "seed": cfg.seed,
  }


def _attack(cfg: fc.SimulationConfig, fd: data.FederatedData, settings: list) -> tuple:
  """Runs the attack for every (name, eps, z) setting: rows, originals, {name: (images, PSNR)}, PSNRs."""
  privacy = cfg.privacy
  x, y = fd.pool.x[0, : FLAGS.num_images], fd.pool.y[0, : FLAGS.num_images]
  originals = np.asarray(models.normalize_pixels(x))
  model = models.make_model(cfg.model, fd.input_shape, fd.num_classes)
  key = jax.random.key(cfg.seed)
  params = models.init_params(model, jax.random.fold_in(key, 0), fd.input_shape)
  blank = inversion.psnr(jnp.zeros_like(originals), originals)
  attack_keys = jax.random.split(jax.random.fold_in(key, 1), FLAGS.num_images)

  rows, images, per_image = [], {}, {}
  for i, (name, eps, z) in enumerate(settings):
    # Fresh noise per setting: with one draw scaled by each z, noise-dominated settings would all show
    # the same reconstruction.
    image_keys = jax.random.split(jax.random.fold_in(key, 2 + i), FLAGS.num_images)
    setting_privacy = fc.PrivacyConfig(
      clip_norm=privacy.clip_norm, delta=privacy.delta, private=z is not None
    )

    def attack(xj, yj, image_key, attack_key, z=z, setting_privacy=setting_privacy):
      gradient = inversion.observed_gradient(
        params,
        xj[None],
        yj[None],
        jnp.float32(z or 0.0),
        image_key,
        apply_fn=model.apply,
        privacy=setting_privacy,
      )
      labels = yj[None] if FLAGS.oracle_labels else inversion.infer_labels(gradient, 1)
      result = inversion.invert_gradient(
        params,
        gradient,
        labels,
        attack_key,
        apply_fn=model.apply,
        input_shape=fd.input_shape,
        clip_norm=None if z is None else privacy.clip_norm,
        num_steps=FLAGS.attack_steps,
        learning_rate=FLAGS.attack_lr,
        distance=FLAGS.distance,
        tv_weight=FLAGS.tv_weight,
      )
      closed_form = (
        inversion.logreg_inversion(gradient, fd.input_shape)[0] if cfg.model.name == "logreg" else None
      )
      return result.x[0], result.labels[0], closed_form

    with report.Timer() as timer:
      x_hat, labels, closed_form = jax.block_until_ready(jax.vmap(attack)(x, y, image_keys, attack_keys))
    quality = np.asarray(inversion.psnr(x_hat, originals))
    images[name], per_image[name] = (np.asarray(x_hat), quality), quality.tolist()
    rows.append(
      {
        "setting": name,
        "eps": eps,
        "noise_multiplier": 0.0 if z is None else z,
        "psnr_mean": float(quality.mean()),
        "psnr_min": float(quality.min()),
        "psnr_max": float(quality.max()),
        "mse_mean": float(inversion.mse(x_hat, originals).mean()),
        "label_accuracy": float(np.mean(np.asarray(labels) == y)),
        "closed_form_psnr_mean": (
          None if closed_form is None else float(inversion.psnr(closed_form, originals).mean())
        ),
        "blank_psnr_mean": float(blank.mean()),
        "wall_time_s": timer.elapsed,
      }
    )
    print(f"{name}: z={rows[-1]['noise_multiplier']:.4g} PSNR {quality.mean():.1f} dB ({timer.elapsed:.1f}s)")

  return rows, originals, images, per_image


if __name__ == "__main__":
  sim_flags.run(main)
