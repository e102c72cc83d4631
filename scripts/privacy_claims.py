"""Recomputes every client's privacy claim from a run's own record (clients.csv): sold vs accounted epsilon.

For each participant row of --clients_csv (written by compare_mechanisms.py), the epsilon its noise
multiplier spends over its steps, for the sampler recorded in the row (``accounting.dp_event``): by RDP
(the run's ledger, truncation charge included), by PLD where dp-accounting supports the sampler (Poisson:
the truncated event itself), and, for contrast, what the same noise would spend under fixed-size batches
(replace-one adjacency, the sampler the project used before issue 11). Outputs in --out:
privacy_claims.{csv,json,md} (one row per client) and privacy_summary.{csv,json,md} (one per mechanism).

  python scripts/compare_mechanisms.py --out=results/default
  python scripts/privacy_claims.py --clients_csv=results/default/clients.csv --out=results/default
"""

from __future__ import annotations

import csv
import math
import os

import numpy as np
from absl import app, flags

from fcfn_jax import report, validate
from fcfn_jax.privacy import accounting

import sim_flags

flags.DEFINE_string("clients_csv", None, "A clients.csv written by compare_mechanisms.py.")
FLAGS = flags.FLAGS
FLAGS.set_default("out", "results/privacy_claims")

CLIENT_COLUMNS = (
  "mechanism",
  "client",
  "num_examples",
  "sampling_rate",
  "noise_multiplier",
  "steps",
  "sampler",
  "batch_capacity",
  "budget_epsilon",
  "epsilon_spent",
  "eps_rdp",
  "eps_pld",
  "eps_fixed_batches",
)
SUMMARY_COLUMNS = (
  "mechanism",
  "participants",
  "sold_eps_max",
  "ledger_over_sold_max",
  "rdp_over_sold_max",
  "pld_over_sold_min",
  "pld_over_sold_max",
  "fixed_batches_eps_max",
)


def _read(path: str) -> list[dict[str, str]]:
  validate.require(path and os.path.isfile(path), f"clients_csv={path!r} is invalid: expected a clients.csv")
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  missing = set(CLIENT_COLUMNS[:10]) - set(rows[0] if rows else ())
  validate.require(rows and not missing, f"clients_csv={path!r} lacks the columns {sorted(missing)}")
  return rows


def recompute(row: dict[str, str]) -> dict[str, object]:
  """One participant's claim, recomputed from its row alone."""
  n, steps, z = int(row["num_examples"]), int(row["steps"]), float(row["noise_multiplier"])
  delta, batch = float(row["delta"]), int(row["batch_size"])
  sampler = accounting.Sampler(row["sampler"], batch, int(row["batch_capacity"]))
  out = {name: row[name] for name in CLIENT_COLUMNS[:8]}
  out.update(budget_epsilon=float(row["budget_epsilon"]), epsilon_spent=float(row["epsilon_spent"]))
  out["eps_rdp"] = accounting.accountant_epsilon(z, n, steps, delta, sampler, "rdp")
  out["eps_pld"] = (
    accounting.accountant_epsilon(z, n, steps, delta, sampler, "pld")
    if sampler.kind == "poisson"
    else math.nan
  )
  fixed = accounting.Sampler("fixed", batch, batch)
  out["eps_fixed_batches"] = accounting.accountant_epsilon(z, n, steps, delta, fixed, "rdp")
  return out


def summarize(rows: list[dict[str, object]]) -> list[dict[str, object]]:
  """One row per mechanism: the largest sold budget and the extreme accounted / sold ratios."""
  summary = []
  for mech in dict.fromkeys(r["mechanism"] for r in rows):
    mine = [r for r in rows if r["mechanism"] == mech]
    sold = np.array([r["budget_epsilon"] for r in mine])

    def ratio(key, mine=mine, sold=sold):
      return np.array([r[key] for r in mine], dtype=float) / sold

    summary.append(
      {
        "mechanism": mech,
        "participants": len(mine),
        "sold_eps_max": float(sold.max()),
        "ledger_over_sold_max": float(ratio("epsilon_spent").max()),
        "rdp_over_sold_max": float(ratio("eps_rdp").max()),
        "pld_over_sold_min": float(np.nanmin(ratio("eps_pld")))
        if mine[0]["sampler"] == "poisson"
        else math.nan,
        "pld_over_sold_max": float(np.nanmax(ratio("eps_pld")))
        if mine[0]["sampler"] == "poisson"
        else math.nan,
        "fixed_batches_eps_max": float(max(r["eps_fixed_batches"] for r in mine)),
      }
    )
  return summary


def main(argv):
  del argv
  rows = sim_flags.config_or_exit(lambda: _read(FLAGS.clients_csv))
  joined = [recompute(r) for r in rows if math.isfinite(float(r["noise_multiplier"])) and int(r["steps"]) > 0]
  summary = summarize(joined)
  os.makedirs(FLAGS.out, exist_ok=True)
  report.write_results(FLAGS.out, "privacy_claims", joined, CLIENT_COLUMNS, {"source": FLAGS.clients_csv})
  report.write_results(FLAGS.out, "privacy_summary", summary, SUMMARY_COLUMNS, {"source": FLAGS.clients_csv})
  print(report.format_table(summary, SUMMARY_COLUMNS))
  print(f"\nwrote {FLAGS.out}/privacy_claims.{{csv,json,md}} and privacy_summary.{{csv,json,md}}")


if __name__ == "__main__":
  app.run(main, flags_parser=sim_flags.parse_flags)
