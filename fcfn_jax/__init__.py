"""fcfn_jax: a JAX-accelerated, vectorized simulator of privacy-incentive federated learning.

Architecture (one module per concept, see docs/model.md):
  config       frozen, validated configuration dataclasses
  data         tfds / .npz / embedded loading, client partitioning, padded packing
  models       flax CNNs and logistic regression
  privacy/     per-example clipping + Gaussian noise (clipping); epsilon <-> noise: the sampler's events
               (events), the surrogate, the traced accountant (traced), the ledger, the calibration
  game/        follower equilibrium and leader (equilibrium, solver, leader), the proposed mechanism
               (stackelberg), the baselines and the dispatcher (baselines), outcomes
  client       one client's round: the sampler's batches and S local steps of DP-SGD
  chunking     clients per vmapped chunk from the backend's memory budget and one client's XLA bytes
  mesh         the client axis over devices: mesh, sharding, a pool split over processes
  federated    the client update vmapped once into a round (chunked, optionally sharded), FedAvg
  simulation   the loop joining mechanism, privacy calibration, rounds and evaluation
  resume       a run's fingerprint; the checks a checkpoint passes before a run resumes from it
  study/       the statistical study: settings and presets, the runner, the tables, the valuation study
  metrics      evaluation and result tables
  checkpoint   atomic orbax checkpoints
"""

__version__ = "0.1.0"
