"""Recomputes every client's privacy claim from a run's own record (clients.csv): sold vs accounted epsilon.

For each participant row of --clients_csv (written by compare_mechanisms.py), the epsilon its noise
multiplier spends over its steps, for the sampler recorded in the row (``accounting.dp_event``): by RDP
(the run's ledger, truncation charge included), by PLD where dp-accounting supports the sampler (Poisson:
the truncated event itself), and, for contrast, what the same noise would spend under fixed-size batches
(replace-one adjacency, the sampler the project used before issue 11). Outputs in --out (written whole at
the end): privacy_claims.{csv,json,md} (one row per client), privacy_summary.{csv,json,md} (one per
mechanism) and manifest.json.

  python scripts/compare_mechanisms.py --out=results/default
  python scripts/privacy_claims.py --clients_csv=results/default/clients.csv --out=results/claims
"""

from __future__ import annotations

import csv
import math
import os

import numpy as np
from absl import flags

from fcfn_jax import config as fc
from fcfn_jax import report, validate
from fcfn_jax.privacy import accounting

import sim_flags

RUN = sim_flags.ConfigFlags(fc.RunConfig, skip=sim_flags.CHECKPOINT_FLAGS)
CLIENTS_CSV = flags.DEFINE_string("clients_csv", None, "A clients.csv written by compare_mechanisms.py.")
sim_flags.FLAGS.set_default("out", "results/privacy_claims")

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


_NEEDED = (*CLIENT_COLUMNS[:10], "delta", "batch_size")


def _read(path: str | None) -> list[dict[str, str]]:
  """The rows of a clients.csv; ConfigError naming the file when it is missing or lacks columns/values."""
  validate.require(path and os.path.isfile(path), f"clients_csv={path!r} is invalid: expected a clients.csv")
  with (
    validate.reraise((OSError, UnicodeDecodeError, csv.Error), lambda e: f"clients_csv={path!r}: {e}"),
    open(path, newline="") as f,
  ):
    rows = list(csv.DictReader(f))
  missing = set(_NEEDED) - set(rows[0] if rows else ())
  validate.require(rows and not missing, f"clients_csv={path!r} lacks the columns {sorted(missing)}")
  for i, row in enumerate(rows):
    with validate.reraise((TypeError, ValueError), lambda e, i=i: f"clients_csv={path!r} row {i + 1}: {e}"):
      for name in ("num_examples", "steps", "batch_size", "batch_capacity"):
        validate.check_int(f"row {i + 1} {name}", int(row[name]), minimum=0)
      for name in ("noise_multiplier", "delta", "budget_epsilon", "epsilon_spent"):
        float(row[name])
      validate.check_choice(f"row {i + 1} sampler", row["sampler"], ("poisson", "fixed"))
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
  run = sim_flags.run_config(RUN)
  rows = _read(CLIENTS_CSV.value)
  participants = [r for r in rows if math.isfinite(float(r["noise_multiplier"])) and int(r["steps"]) > 0]
  header = f"{len(participants)} participants of {len(rows)} client rows in {CLIENTS_CSV.value}"
  with sim_flags.results(run, header, {"source": CLIENTS_CSV.value}) as out:
    joined = [recompute(r) for r in participants]
    summary = summarize(joined)
    out.table("privacy_claims", joined, CLIENT_COLUMNS, {"source": CLIENTS_CSV.value})
    out.table("privacy_summary", summary, SUMMARY_COLUMNS, {"source": CLIENTS_CSV.value})
  print(report.format_table(summary, SUMMARY_COLUMNS))
  print(f"\nwrote {run.out}/privacy_claims.{{csv,json,md}}, privacy_summary.{{csv,json,md}}, manifest.json")


if __name__ == "__main__":
  sim_flags.run(main)
