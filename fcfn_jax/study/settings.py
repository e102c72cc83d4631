"""The study's settings: :class:`Setting`, one experiment design over seeds x draws x mechanisms, and the
presets (docs/RESULTS.md).

A *setting* is one experiment design (data, model, schedule, privacy) run over ``seeds`` seeds (each seed
draws the clients' costs and the data partition: ``SimulationConfig.seed`` = ``DataConfig.seed``) x
``draws`` training-noise draws (``SimulationConfig.draw``) x every mechanism (docs/model.md "Study").
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from fcfn_jax.config import (
  MECHANISMS,
  DataConfig,
  FederatedConfig,
  ModelConfig,
  PrivacyConfig,
  SimulationConfig,
)
from fcfn_jax.validate import check_int, require

Row = dict[str, Any]
REFERENCES = ("stackelberg", "social_optimum")
PAPER_LOGREG_ROUNDS = 20
PAPER_CNN_ROUNDS = 40
SCALING_DRAWS = 3
PAPER_SEEDS_PER_UNIT = 2  # a killed paper study loses at most one unit of 2 seeds per setting


@dataclasses.dataclass(frozen=True)
class Setting:
  """One design of the study.

  Attributes:
    name: the setting's name (tables, folders).
    cfg: the base config; its seed, data.seed, draw and game.mechanism are set per replica.
    seeds: seeds 0 .. seeds - 1 (>= 2: a confidence interval needs two).
    draws: training-noise draws per (seed, mechanism) (>= 1).
    mechanisms: the mechanisms compared (must hold both references: stackelberg and social_optimum).
    eval_examples: test examples of the intermediate rounds' accuracy (0 = all; the last round uses all).
    group: settings of one group (e.g. 'scaling': one per N) form one table across them ('' = none).
    cohort_size: replicas' cohort size (0 = grouped by participant count; K = one program, padded to K).
    seeds_per_unit: seeds trained together and saved as one unit (:func:`run_setting`; 0 = all seeds).
  """

  name: str
  cfg: SimulationConfig
  seeds: int = 10
  draws: int = 3
  mechanisms: tuple[str, ...] = MECHANISMS
  eval_examples: int = 0
  group: str = ""
  cohort_size: int = 0
  seeds_per_unit: int = 0

  def __post_init__(self):
    require(bool(self.name) and self.name.isidentifier(), f"name={self.name!r} is invalid: expected a word")
    require(
      isinstance(self.cfg, SimulationConfig), f"cfg={self.cfg!r} is invalid: expected a SimulationConfig"
    )
    check_int("seeds", self.seeds, minimum=2)
    check_int("draws", self.draws, minimum=1)
    check_int("eval_examples", self.eval_examples, minimum=0)
    check_int("cohort_size", self.cohort_size, minimum=0)
    check_int("seeds_per_unit", self.seeds_per_unit, minimum=0)
    require(
      self.group == "" or self.group.isidentifier(), f"group={self.group!r} is invalid: expected a word"
    )
    unknown = [m for m in self.mechanisms if m not in MECHANISMS]
    require(not unknown, f"mechanisms={self.mechanisms!r} is invalid: expected names from {MECHANISMS}")
    missing = [m for m in REFERENCES if m not in self.mechanisms]
    require(
      not missing and len(set(self.mechanisms)) == len(self.mechanisms),
      f"mechanisms={self.mechanisms!r} is invalid: expected distinct names holding {REFERENCES}",
    )

  def config(self, seed: int, mechanism: str, capacity: int, ceiling: bool = False) -> SimulationConfig:
    """The config of (seed, mechanism): seed and data.seed = seed, the seeds' shared pool capacity; the
    ceiling's is non-private (no clipping, no noise) with plain FedAvg weights."""
    cfg = self.cfg
    return dataclasses.replace(
      cfg,
      seed=seed,
      data=dataclasses.replace(cfg.data, seed=seed, capacity=capacity),
      game=dataclasses.replace(
        cfg.game, mechanism=mechanism, aggregation="fedavg" if ceiling else cfg.game.aggregation
      ),
      # The ceiling trains without noise: its z_i are never used, so the cheapest map computes them.
      privacy=dataclasses.replace(cfg.privacy, private=False, calibration="surrogate")
      if ceiling
      else cfg.privacy,
    )


# ----------------------------------------------------------------------------------------------------------
# Presets (docs/RESULTS.md): the schedules come from the non-private tuning recorded there and stay fixed for
# every mechanism of a setting.
# ----------------------------------------------------------------------------------------------------------


def _cfg(data_cfg: DataConfig, model: str, fed: FederatedConfig) -> SimulationConfig:
  # 'traced': the tight RDP accountant at dp-accounting's orders, vectorized over clients (its host
  # inversion takes seconds per client: hours at N = 5000).
  return SimulationConfig(
    data=data_cfg, model=ModelConfig(model), federated=fed, privacy=PrivacyConfig(calibration="traced")
  )


def _paper(data_dir: str) -> list[Setting]:
  digits = DataConfig(dataset="femnist", source="embedded", partition="writer", num_clients=40)
  femnist62 = DataConfig(
    dataset="femnist",
    source="npz",
    path=os.path.join(data_dir, "femnist_leaf_subset.npz"),
    partition="writer",
    num_clients=40,
  )
  cifar = DataConfig(
    dataset="cifar10", source="npz", path=data_dir, partition="iid", num_clients=40, test_examples=2000
  )
  logreg = FederatedConfig(rounds=PAPER_LOGREG_ROUNDS, local_steps=3, client_lr=1.0)
  # Non-private tuning, seed 0, all 40 clients (docs/RESULTS.md): FEMNIST-62 reaches 0.52 / 0.61 after 40
  # rounds at client lr 0.1 / 0.3; CIFAR-10 Dirichlet(0.5) 0.29 at lr 0.1 and does not learn at lr 0.3.
  cnn = FederatedConfig(rounds=PAPER_CNN_ROUNDS, local_steps=3, client_lr=0.3)
  cifar_cnn = dataclasses.replace(cnn, client_lr=0.1)

  # FEMNIST-62 (the shared LEAF subset, 49k training examples): the embedded digits (31k) cannot give
  # 5,000 Dirichlet(0.5) clients an example each; 62 classes can (min 1, median 10 examples).
  def scaling(n: int, scaled: bool) -> Setting:
    # lambda scaled with N (lambda = lambda_40 x N / 40: the server values its population as the 40-client
    # settings do) or, as the contrast, held at lambda_40 (a server that stops buying as N grows).
    cfg = _cfg(
      dataclasses.replace(femnist62, partition="dirichlet", num_clients=n, min_examples_per_client=1),
      "logreg",
      logreg,
    )
    lam = cfg.game.lam * (n / 40) if scaled else cfg.game.lam
    return Setting(
      f"scaling_n{n}" if scaled else f"scaling_fixed_lambda_n{n}",
      dataclasses.replace(cfg, game=dataclasses.replace(cfg.game, lam=lam)),
      seeds=10,
      draws=SCALING_DRAWS,
      group="scaling" if scaled else "scaling_fixed_lambda",
      eval_examples=500,
    )

  scaling = [scaling(n, scaled) for scaled in (True, False) for n in (100, 1000, 5000)]
  settings = [
    Setting("femnist_logreg", _cfg(digits, "logreg", logreg), seeds=10, draws=3),
    *scaling,
    Setting("femnist_cnn", _cfg(digits, "cnn", cnn), seeds=5, draws=2, eval_examples=500),
    Setting("femnist62_cnn", _cfg(femnist62, "cnn", cnn), seeds=5, draws=2, eval_examples=500),
    Setting(
      "cifar10_dirichlet_cnn",
      _cfg(dataclasses.replace(cifar, partition="dirichlet", dirichlet_alpha=0.5), "cnn", cifar_cnn),
      seeds=5,
      draws=2,
      eval_examples=500,
    ),
    Setting(
      "cifar10_iid_cnn", _cfg(dataclasses.replace(cifar, partition="iid"), "cnn", cifar_cnn), seeds=5, draws=2
    ),
  ]
  return [dataclasses.replace(s, seeds_per_unit=PAPER_SEEDS_PER_UNIT) for s in settings]


def _quick(data_dir: str) -> list[Setting]:
  del data_dir  # the embedded data only: the smoke runs on a fresh clone
  fed = FederatedConfig(rounds=2, local_steps=2, batch_size=16)

  def small(n: int, partition: str) -> DataConfig:
    return DataConfig(
      num_clients=n, partition=partition, min_examples_per_client=8, test_examples=300, capacity=128
    )

  return [
    Setting(
      "femnist_logreg",
      _cfg(small(10, "writer"), "logreg", fed),
      seeds=3,
      draws=2,
      cohort_size=10,
      seeds_per_unit=1,  # the resume path: one unit per seed
    ),
    *(
      Setting(f"scaling_n{n}", _cfg(small(n, "dirichlet"), "logreg", fed), seeds=2, draws=1, group="scaling")
      for n in (10, 20)
    ),
  ]


PRESETS = {"quick": _quick, "paper": _paper}


def preset(
  name: str,
  data_dir: str,
  names: Sequence[str] = ("all",),
  *,
  seeds: int = 0,
  draws: int = 0,
  rounds: int = 0,
  seeds_per_unit: int = 0,
) -> list[Setting]:
  """The settings of preset ``name`` (those in ``names``; 'all' = every one), with the seeds, draws,
  rounds and seeds per unit overridden where > 0. Raises ConfigError naming an unknown preset or
  setting."""
  require(name in PRESETS, f"preset={name!r} is invalid: expected one of {sorted(PRESETS)}")
  check_int("seeds", seeds, minimum=0)
  check_int("draws", draws, minimum=0)
  check_int("rounds", rounds, minimum=0)
  check_int("seeds_per_unit", seeds_per_unit, minimum=0)
  settings = PRESETS[name](data_dir)
  known = [s.name for s in settings]
  unknown = [n for n in names if n != "all" and n not in known]
  require(not unknown, f"settings={list(names)!r} is invalid: {unknown} not in preset {name!r} ({known})")
  chosen = [s for s in settings if "all" in names or s.name in names]
  return [
    dataclasses.replace(
      s,
      seeds=seeds or s.seeds,
      draws=draws or s.draws,
      seeds_per_unit=seeds_per_unit or s.seeds_per_unit,
      cfg=dataclasses.replace(
        s.cfg, federated=dataclasses.replace(s.cfg.federated, rounds=rounds or s.cfg.federated.rounds)
      ),
    )
    for s in chosen
  ]
