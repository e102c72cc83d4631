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
CALIBRATIONS = ("surrogate", "traced", "exact")
SAMPLERS = ("poisson", "fixed")
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam")
MECHANISMS = ("stackelberg", "contract", "three_party", "posted_price", "no_incentive", "social_optimum")
QUALITIES = ("log", "dp")


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
  sampling: how a local step picks its examples, and so what the epsilon certifies:
    'poisson' (default): every example joins with probability q_i = min(1, B / n_i), the step has
      ``batch_capacity`` slots and an overflowing draw keeps a uniform subset of them; add/remove-one
      adjacency.
    'fixed': exactly min(B, n_i) examples without replacement; replace-one adjacency (accounted by
      'rdp' only: dp-accounting's PLD accountant has no sampling-without-replacement event).
  batch_capacity: B_max >= B, the Poisson step's slots; 0 = automatic, the smallest keeping every step's
    overflow probability <= 1e-12 (``accounting.default_capacity``: B = 32 -> 81; README "Privacy").
    Ignored by 'fixed', which always has B slots.
  accountant: dp-accounting's 'rdp' or 'pld' for the exact host-side calibration and reports.
  calibration: 'surrogate' (closed form inside the traced program; conservative), 'traced' (the tight
    RDP accountant of the Poisson-subsampled Gaussian inside the traced program; 'poisson' only) or
    'exact' (host-side accountant inversion before each run).
  private: False turns DP off entirely (the non-private reference path).
  """

  clip_norm: float = 1.0
  delta: float = 1e-5
  sampling: str = "poisson"
  batch_capacity: int = 0
  accountant: str = "rdp"
  calibration: str = "exact"
  private: bool = True

  def __post_init__(self):
    check_positive("clip_norm", self.clip_norm)
    check_open_unit("delta", self.delta)
    check_choice("sampling", self.sampling, SAMPLERS)
    check_int("batch_capacity", self.batch_capacity, minimum=0)
    check_choice("accountant", self.accountant, ACCOUNTANTS)
    check_choice("calibration", self.calibration, CALIBRATIONS)
    check_bool("private", self.private)
    require(
      not (self.sampling == "fixed" and self.accountant == "pld"),
      "accountant='pld' is invalid with sampling='fixed': dp-accounting's PLD accountant has no "
      "sampling-without-replacement event; use accountant='rdp'",
    )
    require(
      not (self.sampling == "fixed" and self.calibration == "traced"),
      "calibration='traced' is invalid with sampling='fixed': the traced accountant is the "
      "Poisson-subsampled Gaussian's; use 'exact' or 'surrogate'",
    )


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
  """The incentive mechanism and the clients' private costs (docs/model.md "The game", "Baselines").

  Per-unit privacy costs c_i ~ Uniform[cost_low, cost_high] (seeded); lam is the server's valuation of
  model quality; budgets live in [0, eps_max]; eps_min is the self-protective budget of 'no_incentive'.
  quality: 'log' (U_s = lam*log(1+X) - R) or 'dp' (U_s = lam*G(eps) - R, G = -sum a_i^2 v(eps_i)).
  """

  mechanism: str = "stackelberg"
  lam: float = 50.0
  cost_low: float = 0.5
  cost_high: float = 2.0
  eps_max: float = 8.0
  eps_min: float = 0.5
  num_types: int = 4
  num_aggregators: int = 4
  quality: str = "log"

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
    check_int("num_types", self.num_types)
    check_int("num_aggregators", self.num_aggregators)
    check_choice("quality", self.quality, QUALITIES)


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
      self.privacy.batch_capacity == 0 or self.privacy.batch_capacity >= self.federated.batch_size,
      f"batch_capacity={self.privacy.batch_capacity} is invalid with batch_size="
      f"{self.federated.batch_size}: expected 0 (automatic) or an integer >= batch_size",
    )
    require(
      not (self.checkpoint_every and not self.checkpoint_dir),
      f"checkpoint_every={self.checkpoint_every} needs checkpoint_dir; got checkpoint_dir=None",
    )
