"""Follower-equilibrium and leader speed: closed form vs the generic solver, vmapped over games.

For each number of clients N, ``--games`` random games are solved by one jit-compiled vmapped call of
  closed_form   equilibrium.closed_form_budgets (sort + prefix sums),
  generic       solver.share_equilibrium with caps that never bind (same answer as the closed form),
  generic_caps  solver.share_equilibrium with caps that bind for the cheapest clients,
  generic_grad  reverse-mode gradient of sum(eps*) w.r.t. (R, c) through the implicit function theorem,
and, for N <= --leader_max_clients, ``--leader_games`` of them by the capped leader (the Stackelberg
mechanism: leader.solve_leader, the optimum of U_s over the capped follower equilibrium) under each
valuation:
  leader_log    Q = log(1 + X), lam = N,
  leader_dp     Q = -(noise variance of the aggregate) with noise-aware weights, lam = 5 N, the
                surrogate eps -> noise map (GameSpec.noise_model='surrogate'),
  noise_table   valuation.noise_table: the accountant's per-client table (built once per game),
  leader_dp_accountant  leader_dp with noise_model='accountant' (interpolating that table),
with eps_max = 2, where caps bind (capped_frac: the share of clients at the cap at R*), q_i = 0.3.
Compile time (lower + compile) is reported apart from steady state (median of ``--repeats`` runs, each
ended by block_until_ready); ratios are to the closed form measured side by side in the same run
(per game for the leader rows).

  python benchmarks/bench_game.py                 # N = 10, 1k, 10k, 100k; 64 games; leader to 10k
  python benchmarks/bench_game.py --quick         # N = 10, 1k
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from fcfn_jax.game import equilibrium, leader, solver
from fcfn_jax.game import valuation as valuation_module
from fcfn_jax.game.spec import Game, GameSpec
from fcfn_jax.report import format_table, write_csv_atomic, write_json_atomic

_SIZES = flags.DEFINE_list("sizes", ["10", "1000", "10000", "100000"], "Numbers of clients N.")
_GAMES = flags.DEFINE_integer("games", 64, "Games per vmapped call.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per method (the median is reported).")
_QUICK = flags.DEFINE_bool("quick", False, "Small sizes (N = 10, 1000) and 3 repeats.")
_X64 = flags.DEFINE_bool("x64", False, "Run in float64 (default float32).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random games.")
_OUT = flags.DEFINE_string("out", "results/bench_game", "Directory for bench_game.json and .csv.")
_LEADER_GAMES = flags.DEFINE_integer("leader_games", 4, "Games per vmapped call of the capped leader.")
_LEADER_MAX = flags.DEFINE_integer("leader_max_clients", 10000, "Largest N with leader rows.")


def random_games(seed: int, games: int, clients: int, dtype):
  """payment [G], costs [G, N], weights [G, N] as in docs/model.md "The game" (w = d / mean d)."""
  rng = np.random.default_rng(seed)
  payment = rng.uniform(1.0, 100.0, games)
  costs = rng.uniform(0.5, 2.0, (games, clients))
  sizes = rng.lognormal(0.0, 1.0, (games, clients))
  return tuple(jnp.asarray(a, dtype) for a in (payment, costs, sizes / sizes.mean(-1, keepdims=True)))


def time_call(fn, *args, repeats: int):
  """(compile seconds, median steady-state seconds, output) of jax.jit(fn)(*args)."""
  start = time.perf_counter()
  # A fresh wrapper per call: the timing is of a real compile, not a hit in jit's cache.
  compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()
  compile_s = time.perf_counter() - start
  out = jax.block_until_ready(compiled(*args))
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    runs.append(time.perf_counter() - start)
  return compile_s, statistics.median(runs), out


def generic_gradient(payment, costs, weights, eps_max):
  return jax.grad(
    lambda r, c: jnp.sum(jax.vmap(solver.share_equilibrium)(r, c, weights, eps_max)), argnums=(0, 1)
  )(payment, costs)


def bench_size(clients: int, games: int, repeats: int, dtype) -> list[dict]:
  payment, costs, weights = random_games(_SEED.value + clients, games, clients, dtype)
  closed_form = jax.vmap(equilibrium.closed_form_budgets)
  generic = jax.vmap(solver.share_equilibrium)
  compile_s, closed_s, closed = time_call(closed_form, payment, costs, weights, repeats=repeats)
  rows = [
    dict(
      clients=clients,
      games=games,
      method="closed_form",
      compile_s=compile_s,
      run_s=closed_s,
      per_game_ms=1e3 * closed_s / games,
      ratio=1.0,
      max_rel_diff=0.0,
      capped_frac=0.0,
    )
  ]
  top = jnp.max(closed, axis=-1, keepdims=True)
  for method, fn, eps_max in (
    ("generic", generic, 10.0 * top),
    ("generic_caps", generic, 0.5 * top),
    ("generic_grad", generic_gradient, 0.5 * top),
  ):
    eps_max = jnp.broadcast_to(eps_max, costs.shape)
    compile_s, run_s, out = time_call(fn, payment, costs, weights, eps_max, repeats=repeats)
    diff = capped = float("nan")
    if method == "generic":
      diff = float(jnp.max(jnp.abs(out - closed)) / jnp.max(jnp.abs(closed)))
    if method != "generic_grad":
      capped = float(jnp.mean(out >= eps_max))
    rows.append(
      dict(
        clients=clients,
        games=games,
        method=method,
        compile_s=compile_s,
        run_s=run_s,
        per_game_ms=1e3 * run_s / games,
        ratio=run_s / closed_s,
        max_rel_diff=diff,
        capped_frac=capped,
      )
    )
  if clients <= _LEADER_MAX.value:
    rows += bench_leader(costs, weights, closed_s / games, repeats)
  return rows


def bench_leader(costs, weights, closed_per_game_s: float, repeats: int) -> list[dict]:
  """The capped leader rows: ``--leader_games`` of the games, one vmapped solve_leader per valuation."""
  games, clients = min(_LEADER_GAMES.value, costs.shape[0]), costs.shape[1]
  dtype = costs.dtype
  rows = []
  for valuation, lam, noise in (
    ("log", clients, "surrogate"),
    ("dp", 5 * clients, "surrogate"),
    ("dp", 5 * clients, "accountant"),
  ):
    batch = Game(
      costs=costs[:games],
      weights=weights[:games],
      sampling_rates=jnp.full((games, clients), 0.3, dtype),
      lam=jnp.full((games,), lam, dtype),
      eps_max=jnp.full((games,), 2.0, dtype),
      eps_min=jnp.full((games,), 1.0, dtype),
      data_epsilon=jnp.full((games,), 4.0, dtype),
    )
    spec = GameSpec(valuation=valuation, noise_model=noise)
    if noise == "accountant":
      compile_s, run_s, table = time_call(
        lambda q, s=spec: valuation_module.noise_table(q, s), batch.sampling_rates, repeats=repeats
      )
      rows.append(
        dict(
          clients=clients,
          games=games,
          method="noise_table",
          compile_s=compile_s,
          run_s=run_s,
          per_game_ms=1e3 * run_s / games,
          ratio=run_s / games / closed_per_game_s,
          max_rel_diff=float("nan"),
          capped_frac=float("nan"),
        )
      )
      batch = batch._replace(noise_table=table)
    compile_s, run_s, out = time_call(
      jax.vmap(lambda g, s=spec: leader.solve_leader(g, s)), batch, repeats=repeats
    )
    rows.append(
      dict(
        clients=clients,
        games=games,
        method=f"leader_{valuation}" + ("_accountant" if noise == "accountant" else ""),
        compile_s=compile_s,
        run_s=run_s,
        per_game_ms=1e3 * run_s / games,
        ratio=run_s / games / closed_per_game_s,
        max_rel_diff=float("nan"),
        capped_frac=float(jnp.mean(out.budgets >= 2.0)),
      )
    )
  return rows


def main(argv):
  del argv
  sizes = [10, 1000] if _QUICK.value else [int(s) for s in _SIZES.value]
  repeats = 3 if _QUICK.value else _REPEATS.value
  with jax.enable_x64(_X64.value):
    dtype = jnp.float64 if _X64.value else jnp.float32
    rows = [row for clients in sizes for row in bench_size(clients, _GAMES.value, repeats, dtype)]
  print(
    f"device: {jax.devices()[0].device_kind}, dtype: {jnp.dtype(dtype).name}, games per call: "
    f"{_GAMES.value}, repeats: {repeats}"
  )
  print(format_table(rows))
  os.makedirs(_OUT.value, exist_ok=True)
  meta = dict(
    device=jax.devices()[0].device_kind,
    backend=jax.default_backend(),
    dtype=jnp.dtype(dtype).name,
    jax=jax.__version__,
    repeats=repeats,
  )
  write_json_atomic(os.path.join(_OUT.value, "bench_game.json"), dict(meta=meta, rows=rows))
  write_csv_atomic(os.path.join(_OUT.value, "bench_game.csv"), rows)


if __name__ == "__main__":
  app.run(main)
