"""Frozen, validated configuration dataclasses (one per concept).

Every config validates itself in ``__post_init__`` with the checks of :mod:`fcfn_jax.validate`, which
raise :class:`~fcfn_jax.validate.ConfigError` naming the offending field, its value and what is allowed.

The scripts' flags are generated from these classes (``scripts/sim_flags.py``), so a field is written
once: its type and default here, its help text as its entry in the class docstring's ``Attributes:``
section, and, for a string with a fixed set of values, the module's tuple named after it in capitals and
plural (``dataset`` -> ``DATASETS``, ``valuation`` -> ``VALUATIONS``), which makes it an enum flag.
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
# How tables and plots name a mechanism: no_incentive is a mandate, not a market (it violates IR).
MECHANISM_LABELS = {name: name for name in MECHANISMS} | {"no_incentive": "no_incentive (mandate)"}
VALUATIONS = ("dp", "log")
AGGREGATIONS = ("noise_aware", "fedavg")
NOISE_MODELS = ("surrogate", "accountant")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which data, from where, and how it is split into clients (docs/model.md "Data").

  Attributes:
    dataset: femnist: EMNIST by writer; emnist: tfds' EMNIST (no writers); cifar10: CIFAR-10.
    source: embedded: the FEMNIST-digits copy inside the package (offline); npz: path is a .npz file (or,
      for cifar10, a folder with cifar10_train_batch1.npz and cifar10_test.npz); tfds: path is a tfds
      data_dir with the dataset prepared as array_record.
    path: the .npz file or folder (source=npz) or the tfds data_dir (source=tfds; default: tfds' own).
    partition: writer: one client per writer (femnist only); dirichlet: label skew Dir(dirichlet_alpha);
      iid.
    dirichlet_alpha: Dirichlet concentration of partition=dirichlet (> 0; small = strong label skew).
    num_clients: number of clients (writers are sampled down to this many; more than the data has is an
      error).
    min_examples_per_client: writers with fewer examples are not clients.
    test_fraction: share of a writer's examples sent to test where the data has no split of its own.
    seed: seed of the partition, the writers' sample and the test subsample.
    digits_only: femnist/emnist: keep only the 10 digit classes.
    capacity: slots per client in the padded pool (0 = the largest client; larger clients keep a seeded
      subsample).
    test_examples: evaluate on a seeded subsample of this many test examples (0 = the whole test split).
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
  """Model family.

  Attributes:
    name: cnn: a small flax CNN for the dataset's image shape; logreg: multinomial logistic regression.
  """

  name: str = "logreg"

  def __post_init__(self):
    check_choice("model", self.name, MODELS)


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
  """DP-SGD parameters (docs/model.md "From epsilon_i to noise").

  Attributes:
    clip_norm: per-example L2 clipping bound C (> 0).
    delta: every client's target delta, in (0, 1).
    sampling: how a local step picks its examples, and so what the epsilon certifies: poisson (default):
      every example joins with probability q_i = min(1, B / n_i), the step has batch_capacity slots and an
      overflowing draw keeps a uniform subset of them; add/remove-one adjacency. fixed: exactly min(B, n_i)
      examples without replacement; replace-one adjacency (accounted by rdp only: dp-accounting's PLD
      accountant has no sampling-without-replacement event).
    batch_capacity: B_max >= B, the Poisson step's slots; 0 = automatic, the smallest keeping every step's
      overflow probability <= 1e-12 (B = 32 -> 81; README "Privacy"). Ignored by fixed, which has B slots.
    accountant: dp-accounting's accountant (rdp or pld) for the exact calibration and the reports.
    calibration: how eps_i -> z_i is solved, once per experiment (then rounded up to float32: the z
      trained is the z accounted): exact: host-side accountant inversion (tight); surrogate: the
      differentiable closed form in jax (conservative: more noise); traced: the tight RDP accountant of the
      Poisson-subsampled Gaussian in jax, differentiable (poisson only).
    private: False turns DP off entirely (no clipping, no noise: the non-private reference).
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

  Attributes:
    rounds: federated rounds T (part of every client's noise calibration: T x S steps).
    local_steps: local DP-SGD steps S per round.
    batch_size: local batch size B (sampling rate q_i = B / n_i).
    client_lr: client SGD learning rate.
    server_lr: server learning rate on the FedAvg pseudo-gradient.
    server_optimizer: the server's optax optimizer.
    chunk_size: clients per vmapped chunk; bounds memory. 0 = automatic: the most clients whose working
      memory fits the backend's budget (CPU: 16 MiB, the cache-sized chunk that is fastest there; GPU/TPU: a
      quarter of the device memory); a value >= the number of clients runs them all at once.
    slot_block: slots per block of a local step: a block runs only when some client of the chunk has a
      joined example in it (the sampler puts them first). 0 = automatic: ceil(B / 4) for poisson, all
      slots for fixed; a value >= batch_capacity runs every slot as one block.
  """

  rounds: int = 10
  local_steps: int = 3
  batch_size: int = 32
  client_lr: float = 0.5
  server_lr: float = 1.0
  server_optimizer: str = "sgd"
  chunk_size: int = 0
  slot_block: int = 0

  def __post_init__(self):
    check_int("rounds", self.rounds)
    check_int("local_steps", self.local_steps)
    check_int("batch_size", self.batch_size)
    check_positive("client_lr", self.client_lr)
    check_positive("server_lr", self.server_lr)
    check_choice("server_optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
    check_int("chunk_size", self.chunk_size, minimum=0)
    check_int("slot_block", self.slot_block, minimum=0)


@dataclasses.dataclass(frozen=True)
class GameConfig:
  """The incentive mechanism, the server's valuation and the clients' private costs (docs/model.md "The
  game", "Stage I", "Aggregation", "Baselines").

  Attributes:
    mechanism: the incentive mechanism that sets the budgets.
    lam: the server's valuation lambda of model quality (> 0).
    cost_low: per-unit privacy costs c_i ~ Uniform[cost_low, cost_high] (seeded; > 0).
    cost_high: upper end of the privacy-cost distribution.
    eps_max: largest budget a client may sell (> 0); budgets live in [0, eps_max].
    eps_min: the mandated budget of 'no_incentive' (1: the usual reference of strong privacy).
    num_types: contract theory's cost types K (quantile bins of the empirical cost distribution);
      0 = one type per client (K = N).
    num_aggregators: the three-party game's edge aggregators M, in [1, N // 2] for N clients; the
      default 4 becomes max(1, N // 2) below 8 clients (with M = 1 three_party buys nothing).
    valuation: dp (Q = -V, the noise variance of the aggregate the server forms; the default) or log
      (Q = log(1 + sum_i w_i eps_i), kept for verification against the closed forms).
    aggregation: noise_aware (weights a_i proportional to 1 / sigma_i^2, sigma_i^2 = v(eps_i) +
      v(data_epsilon) / w_i; the default) or fedavg (a_i proportional to the data size n_i). The training
      round and the valuation read this one field.
    data_epsilon: the budget whose DP noise equals the data term of a client of mean size (> 0): the
      variance its limited data adds, v(data_epsilon) / w_i (docs/model.md "Aggregation").
    noise_model: the game's eps -> noise map v_i(eps) = z_i(eps)^2 (docs/model.md "Stage I"): surrogate
      (the closed form without subsampling, the same for every client) or accountant (the traced RDP
      accountant of the Poisson-subsampled Gaussian at each client's sampling rate q_i, tabulated once per
      game: the noise the round trains with; needs sampling='poisson').
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
  noise_model: str = "surrogate"

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
    check_choice("noise_model", self.noise_model, NOISE_MODELS)


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
  """One experiment: data x model x privacy x federated schedule x mechanism, plus I/O settings.

  Attributes:
    seed: seed of everything (costs, model init, sampling, noise).
    draw: training-noise draw: the rounds' sampling and DP noise use the key fold_in(training key, draw),
      while the costs, the partition and the initial model stay those of seed (replicas of one seed).
    checkpoint_dir: folder of the run's checkpoints (None = no checkpoints).
    checkpoint_every: checkpoint every K rounds (0 = only the last round); needs a checkpoint folder.
  """

  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)
  federated: FederatedConfig = dataclasses.field(default_factory=FederatedConfig)
  game: GameConfig = dataclasses.field(default_factory=GameConfig)
  seed: int = 0
  draw: int = 0
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
    check_seed("draw", self.draw)
    check_path("checkpoint_dir", self.checkpoint_dir)
    check_int("checkpoint_every", self.checkpoint_every, minimum=0)
    require(
      self.privacy.batch_capacity == 0 or self.privacy.batch_capacity >= self.federated.batch_size,
      f"batch_capacity={self.privacy.batch_capacity} is invalid with batch_size="
      f"{self.federated.batch_size}: expected 0 (automatic) or an integer >= batch_size",
    )
    require(
      not (self.game.noise_model == "accountant" and self.privacy.sampling == "fixed"),
      "noise_model='accountant' is invalid with sampling='fixed': the game's accountant is the "
      "Poisson-subsampled Gaussian's; use noise_model='surrogate'",
    )
    most = max(1, self.data.num_clients // 2)
    require(
      self.game.num_aggregators <= most or self.game.num_aggregators == GameConfig.num_aggregators,
      f"num_aggregators={self.game.num_aggregators} is invalid with num_clients={self.data.num_clients}: "
      f"expected an integer in [1, {most}] (N // 2)",
    )
    require(
      not (self.checkpoint_every and not self.checkpoint_dir),
      f"checkpoint_every={self.checkpoint_every} needs checkpoint_dir; got checkpoint_dir=None",
    )


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How a script runs and where it writes (never part of a run's fingerprint; README "Outputs").

  Attributes:
    out: results folder: written whole at the end of the run (a staging folder renamed into place); a
      folder an earlier run wrote is replaced whole, any other non-empty folder is refused.
    progress: show progress bars.
    dry_run: check every flag, the data and the output folder, print the header line, write nothing.
    checkpoint: checkpoint every mechanism into <out>.checkpoints/<mechanism> and resume from it.
    restart_on_mismatch: a checkpoint of another run (other settings or data) is moved aside to
      <folder>.other-run and this run starts fresh; without it such a checkpoint is refused.
  """

  out: str = "results"
  progress: bool = True
  dry_run: bool = False
  checkpoint: bool = False
  restart_on_mismatch: bool = False

  def __post_init__(self):
    require(
      isinstance(self.out, str) and self.out != "",
      f"out={self.out!r} is invalid: expected a folder path (a non-empty string)",
    )
    for name in ("progress", "dry_run", "checkpoint", "restart_on_mismatch"):
      check_bool(name, getattr(self, name))
    require(
      self.checkpoint or not self.restart_on_mismatch,
      "restart_on_mismatch=True needs checkpoint=True: without checkpoints there is nothing to restart",
    )
