"""Frozen, validated configuration dataclasses (one per concept).

Every config validates itself in ``__post_init__`` with the checks of :mod:`fcfn_jax.validate`, which
raise :class:`~fcfn_jax.validate.ConfigError` naming the offending field, its value and what is allowed.
"""

from __future__ import annotations

import dataclasses

from fcfn_jax.validate import (
  check_bool,
  check_choice,
  check_int,
  check_open_unit,
  check_path,
  check_positive,
  check_seed,
  require,
)

DATASETS = ("femnist", "emnist", "cifar10")
SOURCES = ("embedded", "npz", "tfds")
PARTITIONS = ("writer", "dirichlet", "iid")
MODELS = ("cnn", "logreg")
ACCOUNTANTS = ("rdp", "pld")
CALIBRATIONS = ("surrogate", "exact")
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")
MECHANISMS = ("stackelberg", "contract", "three_party", "posted_price", "no_incentive", "social_optimum")
# How tables and plots name a mechanism: no_incentive is a mandate, not a market (it violates IR).
MECHANISM_LABELS = {name: name for name in MECHANISMS} | {"no_incentive": "no_incentive (mandate)"}
VALUATIONS = ("dp", "log")
AGGREGATIONS = ("noise_aware", "fedavg")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which data, from where, and how it is split into clients (docs/model.md "Data").

  dataset: 'femnist' (EMNIST by writer), 'emnist' (alias of femnist for tfds' emnist builder) or 'cifar10'.
  source: 'embedded' (the small copy shipped in the package), 'npz' (``path``) or 'tfds' (``path`` =
    data_dir).
  partition: 'writer' (natural clients; femnist/emnist only), 'dirichlet' (label-skew, ``dirichlet_alpha``)
    or 'iid'. ``num_clients`` caps the writer partition and sets the size of the synthetic ones.
  digits_only: keep only EMNIST digits (labels 0-9; tfds loads its 'emnist/digits' config).
  capacity: slots per client row of the packed pool; 0 = the largest client's size (larger clients
    keep a seeded subsample).
  test_examples: size of a seeded subsample of the test split; 0 = the whole split.
  """

  dataset: str = "femnist"
  source: str = "embedded"
  path: str | None = None
  partition: str = "writer"
  dirichlet_alpha: float = 0.5
  num_clients: int = 40
  min_examples_per_client: int = 16
  test_fraction: float = 0.2
  seed: int = 0
  digits_only: bool = False
  capacity: int = 0
  test_examples: int = 0

  def __post_init__(self):
    check_choice("dataset", self.dataset, DATASETS)
    check_choice("source", self.source, SOURCES)
    check_choice("partition", self.partition, PARTITIONS)
    require(
      not (self.partition == "writer" and self.dataset == "cifar10"),
      "partition='writer' is invalid for dataset='cifar10': CIFAR-10 has no writer ids; "
      "use 'dirichlet' or 'iid'",
    )
    check_path("path", self.path)
    require(
      not (self.source == "npz" and not self.path), "source='npz' needs path= a .npz file; got path=None"
    )
    check_positive("dirichlet_alpha", self.dirichlet_alpha)
    check_int("num_clients", self.num_clients, minimum=2)
    check_int("min_examples_per_client", self.min_examples_per_client, minimum=1)
    check_open_unit("test_fraction", self.test_fraction)
    check_seed("seed", self.seed)
    check_bool("digits_only", self.digits_only)
    require(
      not (self.digits_only and self.dataset == "cifar10"),
      "digits_only=True is invalid for dataset='cifar10': only EMNIST has digit classes",
    )
    check_int("capacity", self.capacity, minimum=0)
    check_int("test_examples", self.test_examples, minimum=0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Model family: 'cnn' (flax CNN for the dataset's image shape) or 'logreg' (multinomial logistic)."""

  name: str = "logreg"

  def __post_init__(self):
    check_choice("model", self.name, MODELS)


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
  """DP-SGD parameters (docs/model.md "From epsilon_i to noise").

  clip_norm: per-example L2 clipping bound C. delta: target delta of every client's (eps, delta)-DP.
  accountant: dp-accounting's 'rdp' or 'pld' for the exact host-side calibration and reports.
  calibration: 'surrogate' (differentiable closed form inside the traced program; conservative) or
    'exact' (host-side accountant inversion before each run).
  private: False turns DP off entirely (the non-private reference path).
  """

  clip_norm: float = 1.0
  delta: float = 1e-5
  accountant: str = "rdp"
  calibration: str = "exact"
  private: bool = True

  def __post_init__(self):
    check_positive("clip_norm", self.clip_norm)
    check_open_unit("delta", self.delta)
    check_choice("accountant", self.accountant, ACCOUNTANTS)
    check_choice("calibration", self.calibration, CALIBRATIONS)
    check_bool("private", self.private)


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
  """Federated training: T rounds, S local DP-SGD steps of batch B per client per round, FedAvg server.

  chunk_size: clients per vmapped chunk (``lax.map`` over chunks bounds memory); 0 = all clients at once.
  """

  rounds: int = 10
  local_steps: int = 3
  batch_size: int = 32
  client_lr: float = 0.5
  server_lr: float = 1.0
  server_optimizer: str = "sgd"
  chunk_size: int = 0

  def __post_init__(self):
    check_int("rounds", self.rounds)
    check_int("local_steps", self.local_steps)
    check_int("batch_size", self.batch_size)
    check_positive("client_lr", self.client_lr)
    check_positive("server_lr", self.server_lr)
    check_choice("server_optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
    check_int("chunk_size", self.chunk_size, minimum=0)


@dataclasses.dataclass(frozen=True)
class GameConfig:
  """The incentive mechanism, the server's valuation and the clients' private costs (docs/model.md "The
  game", "Stage I", "Aggregation", "Baselines").

  Per-unit privacy costs c_i ~ Uniform[cost_low, cost_high] (seeded); lam is the server's valuation of
  model quality; budgets live in [0, eps_max]; eps_min is the mandated budget of 'no_incentive' (1: the
  usual reference of strong privacy, a self-protective demand rather than a strawman).
  valuation: 'dp' (Q = -V, the noise variance of the aggregate the server forms; the default) or 'log'
    (Q = log(1 + sum_i w_i eps_i), kept for verification against the closed forms).
  aggregation: 'noise_aware' (weights a_i proportional to 1 / sigma_i^2, sigma_i^2 = v(eps_i) +
    v(data_epsilon) / w_i; the default) or 'fedavg' (a_i proportional to the data size n_i). The
    training round and the valuation read this one field.
  data_epsilon: the budget whose DP noise equals the data term of a client of mean size (> 0): the
    variance its limited data adds, v(data_epsilon) / w_i. Calibrated on the valuation study
    (docs/model.md "Aggregation"); larger = data counts less.
  num_types: contract theory's cost types K (quantile bins of the empirical cost distribution); 0 = one
    type per client (K = N). num_aggregators: the three-party game's edge aggregators M (at most N // 2).
  """

  mechanism: str = "stackelberg"
  lam: float = 50.0
  cost_low: float = 0.5
  cost_high: float = 2.0
  eps_max: float = 8.0
  eps_min: float = 1.0
  num_types: int = 0
  num_aggregators: int = 4
  valuation: str = "dp"
  aggregation: str = "noise_aware"
  data_epsilon: float = 4.0

  def __post_init__(self):
    check_choice("mechanism", self.mechanism, MECHANISMS)
    check_positive("lam", self.lam)
    check_positive("cost_low", self.cost_low)
    check_positive("cost_high", self.cost_high)
    require(
      self.cost_low <= self.cost_high,
      f"cost_low={self.cost_low!r} > cost_high={self.cost_high!r}: expected cost_low <= cost_high",
    )
    check_positive("eps_max", self.eps_max)
    check_positive("eps_min", self.eps_min)
    require(
      self.eps_min <= self.eps_max,
      f"eps_min={self.eps_min!r} > eps_max={self.eps_max!r}: expected eps_min <= eps_max",
    )
    check_int("num_types", self.num_types, minimum=0)
    check_int("num_aggregators", self.num_aggregators)
    check_choice("valuation", self.valuation, VALUATIONS)
    check_choice("aggregation", self.aggregation, AGGREGATIONS)
    check_positive("data_epsilon", self.data_epsilon)


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
  """One experiment: data x model x privacy x federated schedule x mechanism, plus I/O settings."""

  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
  federated: FederatedConfig = dataclasses.field(default_factory=FederatedConfig)
  game: GameConfig = dataclasses.field(default_factory=GameConfig)
  seed: int = 0
  checkpoint_dir: str | None = None
  checkpoint_every: int = 0

  def __post_init__(self):
    for name, cls in (
      ("data", DataConfig),
      ("model", ModelConfig),
      ("privacy", PrivacyConfig),
      ("federated", FederatedConfig),
      ("game", GameConfig),
    ):
      require(
        isinstance(getattr(self, name), cls),
        f"{name}={getattr(self, name)!r} is invalid: expected a {cls.__name__}",
      )
    check_seed("seed", self.seed)
    check_path("checkpoint_dir", self.checkpoint_dir)
    check_int("checkpoint_every", self.checkpoint_every, minimum=0)
    require(
      not (self.checkpoint_every and not self.checkpoint_dir),
      f"checkpoint_every={self.checkpoint_every} needs checkpoint_dir; got checkpoint_dir=None",
    )
