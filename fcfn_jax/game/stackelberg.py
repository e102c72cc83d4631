"""The proposed mechanism: the improved two-stage Stackelberg game (docs/model.md "Stage I", "Stage II").

The server (leader) pays R in total and the clients (followers) share it in proportion to their
contributions x_i = w_i eps_i, each choosing eps_i in [0, eps_max] against its privacy cost c_i eps_i.
The leader's capped optimum (``leader.solve_leader``): R* maximizes the server's true objective
lam Q(eps*(R)) - R over the followers' capped Nash equilibrium eps*(R); payment_i = R* x_i / X. The
baselines it is compared with are in ``baselines.py``, on the same game and accounting (``outcome``).
"""

from __future__ import annotations

from fcfn_jax.game import common, leader
from fcfn_jax.game.outcome import Outcome, build_outcome
from fcfn_jax.game.spec import Game, GameSpec


@common.mechanism
def stackelberg(game: Game, spec: GameSpec) -> Outcome:
  """The proposed mechanism: the leader's capped optimum R*, the followers' capped Nash equilibrium,
  payment_i = R* x_i / X (docs/model.md "Stage I")."""
  solution = leader.solve_leader(game, spec)
  payments = common.proportional(solution.payment, game.weights * solution.budgets)
  return build_outcome(solution.budgets, payments, game, spec)
