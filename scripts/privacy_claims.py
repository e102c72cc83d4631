"""Recomputes every client's privacy claim from a run's own record (clients.csv): sold vs accounted epsilon.

For each participant row of --clients_csv (written by compare_mechanisms.py), the epsilon its noise
multiplier spends over its steps, for the sampler recorded in the row (``events.dp_event``): by RDP
(the run's ledger, truncation charge included), by PLD where dp-accounting supports the sampler (Poisson:
the truncated event itself), and, for contrast, what the same noise would spend under fixed-size batches
(replace-one adjacency, the sampler the project used before issue 11). The row's recorded epsilon_spent is
checked against the recomputation by the row's accountant (``ledger_agrees``; a disagreement is counted per
mechanism). Outputs in --out (written whole at the end): privacy_claims.{csv,json,md} (one row per
participant, and per non-participant whose ledger disagrees), privacy_summary.{csv,json,md} (one per
mechanism) and manifest.json.

Every row is validated before any work (exit 2 and one line naming the line, column and what is allowed):
counts are integers (steps <= MAX_STEPS), sampling_rate = min(1, batch_size / num_examples) in (0, 1],
noise_multiplier inf (sat out) or in the calibration's range, budgets and epsilons finite and >= 0.
Identical rows are computed once. Empty cells: eps_pld for the fixed sampler (dp-accounting has no PLD of
it) or when the RDP epsilon exceeds PLD_EPSILON_LIMIT (PLD's cost grows with epsilon); a statistic over no
row. inf: the RDP accountant finds no finite epsilon at the row's delta (said in its note).

  python scripts/compare_mechanisms.py --out=results/default
  python scripts/privacy_claims.py --clients_csv=results/default/clients.csv --out=results/claims
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple, NoReturn

import numpy as np
import tqdm
from absl import flags
from dp_accounting import rdp as dp_rdp

from fcfn_jax import config as fc
from fcfn_jax import data, report, validate
from fcfn_jax.privacy import calibration, events, ledger

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
  "ledger_agrees",
  "note",
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
  "ledger_mismatches",
)

# Steps of one client's run; no run of this simulator comes near (rounds x local steps), and the PLD and
# fixed-batch accountants' work grows with it.
MAX_STEPS = 10**7
# Examples, batch sizes and capacities (a typo such as 1e15 examples is no client).
MAX_COUNT = 10**12
# eps_pld is computed only where the (uncharged) RDP epsilon is at most this: the PLD's support grows with
# epsilon (z = 1.5, q = 0.5 over 10^6 steps, eps ~ 6e4: 42 s and 1.9 GB; over 10^7 steps: 3 GB at once).
PLD_EPSILON_LIMIT = 100.0
# A recorded epsilon_spent agrees with the recomputation within this relative (and 1e-9 absolute) error.
LEDGER_RTOL = 1e-6
# A per-client table longer than this is written as CSV alone.
LONG_TABLE = 10_000
# Memory per byte of the file: the cells read and one output row each (about 25 for a 22 MB file of
# 2e5 rows, written as CSV alone; 40 leaves room).
_MEMORY_PER_BYTE = 40

_NEEDED = (*CLIENT_COLUMNS[:10], "delta", "batch_size")
_Z_MIN, _Z_MAX = calibration.CALIBRATION_Z_RANGE  # dp-accounting fails beyond (z = 1e23: math domain error)


class Rows(NamedTuple):
  """The validated columns of a clients.csv, one entry per client row; ``line`` is its line in the file."""

  line: np.ndarray
  mechanism: list[str]
  client: np.ndarray
  num_examples: np.ndarray
  sampling_rate: np.ndarray
  noise_multiplier: np.ndarray
  steps: np.ndarray
  sampler: list[str]
  batch_size: np.ndarray
  batch_capacity: np.ndarray
  delta: np.ndarray
  accountant: list[str]
  budget_epsilon: np.ndarray
  epsilon_spent: np.ndarray

  @property
  def participant(self) -> np.ndarray:
    """Who took a DP step: noise_multiplier finite and steps > 0 [rows]."""
    return np.isfinite(self.noise_multiplier) & (self.steps > 0)


def _read_cells(path: str | None) -> tuple[list[int], dict[str, list[str]]]:
  """The needed columns' cells (and their lines) of a clients.csv; ConfigError naming what is wrong."""
  validate.require(path and os.path.isfile(path), f"clients_csv={path!r} is invalid: expected a clients.csv")
  size, limit = os.path.getsize(path), data.memory_limit()
  validate.require(
    size * _MEMORY_PER_BYTE <= limit,
    f"clients_csv={path!r} has {size} bytes: its claims need about "
    f"{size * _MEMORY_PER_BYTE / 2**30:.3g} GiB, expected at most "
    f"{limit / 2**30:.3g} GiB (half of this machine's memory); split the file",
  )
  with (
    validate.reraise((OSError, UnicodeDecodeError, csv.Error), lambda e: f"clients_csv={path!r}: {e}"),
    open(path, newline="") as f,
  ):
    reader = csv.reader(f)
    header = next(reader, None)
    validate.require(header, f"clients_csv={path!r} is empty: expected a header and one row per client")
    missing = [name for name in _NEEDED if name not in header]
    validate.require(
      not missing,
      f"clients_csv={path!r} lacks the columns {missing}: expected a clients.csv written by "
      "compare_mechanisms.py",
    )
    wanted = [name for name in (*_NEEDED, "accountant") if name in header]
    index = [header.index(name) for name in wanted]
    cells: dict[str, list[str]] = {name: [] for name in wanted}
    lines = []
    for row in reader:
      if not row:  # a blank line
        continue
      validate.require(
        len(row) == len(header),
        f"clients_csv={path!r} line {reader.line_num} has {len(row)} cells: expected {len(header)}, one per "
        "column of the header",
      )
      lines.append(reader.line_num)
      for name, j in zip(wanted, index):
        cells[name].append(row[j])
  validate.require(
    lines, f"clients_csv={path!r} has a header but no client rows: expected one row per client"
  )
  return lines, cells


def _column(
  path: str, lines: Sequence[int], name: str, texts: list[str], integer: bool, ok: Callable, allowed: str
) -> np.ndarray:
  """``texts`` parsed as int64 or float64 (vectorized); ConfigError naming the first line that does not
  parse or fails ``ok`` (NaN always fails)."""
  parse, dtype = (int, np.int64) if integer else (float, np.float64)

  def bad(i: int) -> NoReturn:
    validate.fail(f"clients_csv={path!r} line {lines[i]}: {name}={texts[i]!r} is invalid: expected {allowed}")

  try:
    values = np.asarray(texts).astype(dtype)
  except (ValueError, OverflowError):  # find the cell: Python's parser is the reference
    values = np.empty(len(texts), dtype)
    for i, text in enumerate(texts):
      try:
        values[i] = parse(text)
      except (ValueError, OverflowError):  # not a number, or an integer beyond int64
        bad(i)
  with np.errstate(invalid="ignore"):
    wrong = ~np.asarray(ok(values), bool) | (False if integer else np.isnan(values))
  if wrong.any():
    bad(int(np.argmax(wrong)))
  return values


def _choice(
  path: str, lines: Sequence[int], name: str, texts: list[str], allowed: Sequence[str]
) -> list[str]:
  options = set(allowed)
  for line, text in zip(lines, texts):
    validate.require(
      text in options,
      f"clients_csv={path!r} line {line}: {name}={text!r} is invalid: expected one of {sorted(allowed)}",
    )
  return texts


def _first(path: str, lines: Sequence[int], bad: np.ndarray, describe: Callable[[int], str]) -> None:
  """ConfigError for the first row where ``bad`` holds, described by ``describe(row)``."""
  if bad.any():
    i = int(np.argmax(bad))
    validate.fail(f"clients_csv={path!r} line {lines[i]}: {describe(i)}")


def read_rows(path: str | None) -> Rows:
  """The rows of a clients.csv, every cell validated; ConfigError naming the file, line, column and what is
  allowed."""
  lines, cells = _read_cells(path)

  def integer(name: str, low: int, high: int) -> np.ndarray:
    allowed = f"an integer in [{low}, {high}]"
    return _column(path, lines, name, cells[name], True, lambda a: (a >= low) & (a <= high), allowed)

  def number(name: str, ok: Callable, allowed: str) -> np.ndarray:
    return _column(path, lines, name, cells[name], False, ok, allowed)

  finite_nonnegative = (lambda a: np.isfinite(a) & (a >= 0), "a finite number >= 0")
  rows = Rows(
    line=np.asarray(lines),
    mechanism=_choice(path, lines, "mechanism", cells["mechanism"], fc.MECHANISMS),
    client=integer("client", 0, MAX_COUNT),
    num_examples=integer("num_examples", 1, MAX_COUNT),
    sampling_rate=number("sampling_rate", lambda a: (a > 0) & (a <= 1), "a number in (0, 1]"),
    noise_multiplier=number(
      "noise_multiplier",
      lambda a: (a == math.inf) | ((a >= _Z_MIN) & (a <= _Z_MAX)),
      f"inf (sat out) or a number in [{_Z_MIN:g}, {_Z_MAX:g}] (the calibration's range)",
    ),
    steps=integer("steps", 0, MAX_STEPS),
    sampler=_choice(path, lines, "sampler", cells["sampler"], fc.SAMPLERS),
    batch_size=integer("batch_size", 1, MAX_COUNT),
    batch_capacity=integer("batch_capacity", 1, MAX_COUNT),
    delta=number("delta", lambda a: (a > 0) & (a < 1), "a number in (0, 1)"),
    accountant=_choice(path, lines, "accountant", cells["accountant"], fc.ACCOUNTANTS)
    if "accountant" in cells
    else ["rdp"] * len(lines),
    budget_epsilon=number("budget_epsilon", *finite_nonnegative),
    epsilon_spent=number("epsilon_spent", *finite_nonnegative),
  )
  fixed = np.asarray(rows.sampler) == "fixed"
  _first(
    path,
    lines,
    (rows.batch_capacity < rows.batch_size) | (fixed & (rows.batch_capacity != rows.batch_size)),
    lambda i: (
      f"batch_capacity={rows.batch_capacity[i]} is invalid for sampler={rows.sampler[i]!r}: expected "
      + ("batch_size" if fixed[i] else "an integer >= batch_size")
      + f"={rows.batch_size[i]}"
    ),
  )
  rate = np.minimum(1.0, rows.batch_size / rows.num_examples)  # events.sampling_rates, per row
  _first(
    path,
    lines,
    ~np.isclose(rows.sampling_rate, rate, rtol=1e-9, atol=0),
    lambda i: (
      f"sampling_rate={float(rows.sampling_rate[i])!r} is invalid: expected min(1, batch_size / num_examples)"
      f" = {float(rate[i])!r}, the rate the run samples at"
    ),
  )
  _first(
    path,
    lines,
    rows.participant & (rows.budget_epsilon == 0),
    lambda i: (
      "budget_epsilon=0.0 is invalid for a participant "
      f"(noise_multiplier={float(rows.noise_multiplier[i])!r}, steps={rows.steps[i]}): expected a "
      "budget > 0 (a client that sold none sits out)"
    ),
  )
  return rows


class Claim(NamedTuple):
  """One distinct (sampler, delta, n, steps, z)'s recomputed epsilons; ``pld`` None where not computed."""

  rdp: float
  pld: float | None
  fixed_batches: float
  note: str


def _uncharged_rdp(z: float, n: int, steps: int, delta: float, sampler: events.Sampler) -> float:
  """The RDP epsilon of the untruncated event without the truncation charge (a bound on the PLD's)."""
  client = events.dp_event(z, n, steps, sampler, "rdp")
  acc = dp_rdp.RdpAccountant(neighboring_relation=client.relation)
  acc.compose(client.event)
  return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=4096)
def recompute(z: float, n: int, steps: int, delta: float, sampler: events.Sampler) -> Claim:
  """One participant's claim, recomputed from its row alone (a pure function of it: cached)."""
  rdp = ledger.accountant_epsilon(z, n, steps, delta, sampler, "rdp")
  fixed = events.Sampler("fixed", sampler.batch_size, sampler.batch_size)
  fixed_batches = ledger.accountant_epsilon(z, n, steps, delta, fixed, "rdp")
  notes = []
  if math.isinf(rdp):
    notes.append("RDP: no finite epsilon at this delta")
  if math.isinf(fixed_batches):
    notes.append("fixed batches: no finite epsilon at this delta")
  pld = None
  if sampler.kind == "fixed":
    notes.append("PLD: no event for fixed batches")
  elif rdp <= PLD_EPSILON_LIMIT or _uncharged_rdp(z, n, steps, delta, sampler) <= PLD_EPSILON_LIMIT:
    pld = ledger.accountant_epsilon(z, n, steps, delta, sampler, "pld")
  else:
    notes.append(f"PLD skipped: RDP epsilon > {PLD_EPSILON_LIMIT:g}")
  return Claim(rdp, pld, fixed_batches, "; ".join(notes))


class _ConvergenceWarnings(logging.Filter):
  """Drops dp-accounting's '_compute_log_a_frac failed to converge' warnings (that order is excluded from
  the RDP minimum, as the accountant says) and counts them."""

  def __init__(self):
    super().__init__()
    self.count = 0

  def filter(self, record: logging.LogRecord) -> bool:
    if "failed to converge" in str(record.msg):
      self.count += 1
      return False
    return True


def claims(rows: Rows, progress: bool = False) -> tuple[list[Claim | None], int]:
  """The claim of every row (None for non-participants: they spent 0), each distinct row computed once;
  plus how many convergence warnings dp-accounting raised (silenced)."""
  keys = [
    (rows.sampler[i], int(rows.batch_size[i]), int(rows.batch_capacity[i]), float(rows.delta[i]))
    + (int(rows.num_examples[i]), int(rows.steps[i]), float(rows.noise_multiplier[i]))
    if live
    else None
    for i, live in enumerate(rows.participant)
  ]
  distinct = {key: None for key in keys if key is not None}
  warnings = _ConvergenceWarnings()
  logger = logging.getLogger("absl")
  logger.addFilter(warnings)
  try:
    for key in tqdm.tqdm(list(distinct), desc="distinct rows", disable=not progress, leave=False):
      kind, batch, capacity, delta, n, steps, z = key
      distinct[key] = recompute(z, n, steps, delta, events.Sampler(kind, batch, capacity))
  finally:
    logger.removeFilter(warnings)
  return [None if key is None else distinct[key] for key in keys], warnings.count


def _agrees(recorded: float, recomputed: float | None) -> bool | None:
  if recomputed is None:
    return None
  return math.isclose(recorded, recomputed, rel_tol=LEDGER_RTOL, abs_tol=1e-9)


def joined_rows(rows: Rows, results: Sequence[Claim | None]) -> list[dict[str, object]]:
  """One output row per row of the file: its cells, the recomputed epsilons and the ledger check."""
  out = []
  for i, claim in enumerate(results):
    if claim is None:  # sat out: released nothing
      claim = Claim(0.0, 0.0 if rows.sampler[i] == "poisson" else None, 0.0, "sat out")
    recorded = float(rows.epsilon_spent[i])
    agrees = _agrees(recorded, claim.pld if rows.accountant[i] == "pld" else claim.rdp)
    note = claim.note
    if agrees is False:
      note = "; ".join(filter(None, [note, "ledger disagrees with the recomputation"]))
    out.append(
      {
        "mechanism": rows.mechanism[i],
        "client": int(rows.client[i]),
        "accountant": rows.accountant[i],
        "num_examples": int(rows.num_examples[i]),
        "sampling_rate": float(rows.sampling_rate[i]),
        "noise_multiplier": float(rows.noise_multiplier[i]),
        "steps": int(rows.steps[i]),
        "sampler": rows.sampler[i],
        "batch_capacity": int(rows.batch_capacity[i]),
        "budget_epsilon": float(rows.budget_epsilon[i]),
        "epsilon_spent": recorded,
        "eps_rdp": claim.rdp,
        "eps_pld": claim.pld,
        "eps_fixed_batches": claim.fixed_batches,
        "ledger_agrees": agrees,
        "note": note,
      }
    )
  return out


def summarize(rows: Sequence[dict[str, object]], participant: np.ndarray) -> list[dict[str, object]]:
  """One row per mechanism: the largest sold budget, the extreme accounted / sold ratios over participants
  (None over none) and how many of its rows' ledgers disagree."""

  def extreme(pick, values):
    values = [v for v in values if v is not None]
    return float(pick(values)) if values else None

  summary = []
  for mech in dict.fromkeys(r["mechanism"] for r in rows):
    mine = [r for r, live in zip(rows, participant) if live and r["mechanism"] == mech]
    ratios = {
      key: [None if r[key] is None else r[key] / r["budget_epsilon"] for r in mine]
      for key in ("epsilon_spent", "eps_rdp", "eps_pld")
    }
    summary.append(
      {
        "mechanism": mech,
        "participants": len(mine),
        "sold_eps_max": extreme(max, [r["budget_epsilon"] for r in mine]),
        "ledger_over_sold_max": extreme(max, ratios["epsilon_spent"]),
        "rdp_over_sold_max": extreme(max, ratios["eps_rdp"]),
        "pld_over_sold_min": extreme(min, ratios["eps_pld"]),
        "pld_over_sold_max": extreme(max, ratios["eps_pld"]),
        "fixed_batches_eps_max": extreme(max, [r["eps_fixed_batches"] for r in mine]),
        "ledger_mismatches": sum(r["ledger_agrees"] is False for r in rows if r["mechanism"] == mech),
      }
    )
  return summary


def main(argv):
  del argv
  run = sim_flags.run_config(RUN)
  rows = read_rows(CLIENTS_CSV.value)
  participant = rows.participant
  header = f"{int(participant.sum())} participants of {len(rows.line)} client rows in {CLIENTS_CSV.value}"
  with sim_flags.results(run, header, {"source": CLIENTS_CSV.value}) as out:
    results, warned = claims(rows, run.progress)
    every = joined_rows(rows, results)
    summary = summarize(every, participant)
    shown = [r for r, live in zip(every, participant) if live or r["ledger_agrees"] is False]
    if len(shown) <= LONG_TABLE:
      out.table("privacy_claims", shown, CLIENT_COLUMNS, {"source": CLIENTS_CSV.value})
    else:  # a long table: the CSV alone (its JSON and markdown would take minutes and be unreadable)
      out.csv("privacy_claims", shown, (*CLIENT_COLUMNS, "accountant"))
    out.table("privacy_summary", summary, SUMMARY_COLUMNS, {"source": CLIENTS_CSV.value})
  print(report.format_table(summary, SUMMARY_COLUMNS))
  mismatches = [r for r in every if r["ledger_agrees"] is False]
  if mismatches:
    first = mismatches[0]
    recomputed = first["eps_pld"] if first["accountant"] == "pld" else first["eps_rdp"]
    print(
      f"\nledger: {len(mismatches)} of {len(every)} rows record an epsilon_spent that disagrees with the "
      f"recomputation (first: {first['mechanism']} client {first['client']} records "
      f"{first['epsilon_spent']:.6g}, recomputed {recomputed:.6g}); see ledger_agrees in privacy_claims.csv"
    )
  else:
    print(f"\nledger: every recorded epsilon_spent agrees with the recomputation (relative {LEDGER_RTOL:g})")
  if warned:
    print(
      f"dp-accounting: {warned} '_compute_log_a_frac failed to converge' warnings silenced (each excludes "
      "one fractional RDP order from the minimum, as dp-accounting does)"
    )
  claims_files = "{csv,json,md}" if len(shown) <= LONG_TABLE else f"csv ({len(shown)} rows: CSV alone)"
  print(f"\nwrote {run.out}/privacy_claims.{claims_files}, privacy_summary.{{csv,json,md}}, manifest.json")


if __name__ == "__main__":
  sim_flags.run(main)
