"""The scripts as a hostile user drives them (issue 12): every flag fuzzed, every reproducer under test.

Misuse must end with exit status 2, one line ``error: ...`` naming the flag or value and what is allowed,
no traceback, and nothing written; a run either writes its whole output folder or nothing. The scripts
run in tests/cli_worker.py processes (one per script, many command lines each).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcfn_jax import config as fc
from fcfn_jax import report
from fcfn_jax.privacy import events, ledger

from .cli import REPO, SCRIPTS, TINY, ScriptWorker, env, import_script

# ----------------------------------------------------------------------------------------------------------
# Fixtures: one worker per script, and a folder of good and bad files to point flags at.
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
  """Every script's worker, started together (their imports overlap); tfds sees an empty data_dir."""
  tfds_dir = str(tmp_path_factory.mktemp("tfds"))
  started = {script: ScriptWorker(script, TFDS_DATA_DIR=tfds_dir) for script in SCRIPTS}
  yield started.__getitem__
  for worker in started.values():
    worker._proc.stdin.close()  # every worker winds down at once
  for worker in started.values():
    worker.close()


def _leaf_source(path) -> None:
  """A tiny file in the shared LEAF layout (what make_embedded_dataset.py reads)."""
  rng = np.random.default_rng(0)
  np.savez(
    path,
    x=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
    y=rng.integers(0, 12, 40),
    writer=np.repeat(np.arange(4), 10),
    writers=np.array(["w0", "w1", "w2", "w3"]),
    leaf_split=np.tile([0, 0, 0, 1], 10).astype(np.uint8),
  )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  (root / "a_file").write_text("not a folder")
  (root / "foreign").mkdir()
  (root / "foreign" / "notes.txt").write_text("a folder no run wrote")
  (root / "corrupt.npz").write_bytes(b"PK\x03\x04 broken")
  _leaf_source(root / "leaf.npz")
  (root / "clients.csv").write_text(  # what privacy_claims.py reads: a participant and a client left out
    "mechanism,client,num_examples,sampling_rate,noise_multiplier,steps,sampler,batch_capacity,"
    "budget_epsilon,epsilon_spent,delta,batch_size\n"
    "stackelberg,0,64,0.5,1.5,3,poisson,81,2.0,1.9,1e-05,32\n"
    "stackelberg,1,64,0.5,inf,0,poisson,81,0.0,0.0,1e-05,32\n"
  )
  return root


def _snapshot(root) -> dict[str, int]:
  return {
    os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
    for d, dirs, fs in os.walk(root)
    for f in fs + [x + "/" for x in dirs]
    if os.path.exists(os.path.join(d, f))
  } | {os.path.relpath(os.path.join(d, x), root) + "/": 0 for d, dirs, _ in os.walk(root) for x in dirs}


def _assert_misuse(result, *expected: str) -> None:
  """Exit 2, one line on stderr starting 'error: ' and holding every ``expected`` text, no traceback."""
  assert result.rc == 2, result
  assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
  assert "Traceback" not in result.stdout + result.stderr
  for text in expected:
    assert text in result.stderr, (text, result.stderr)


# ----------------------------------------------------------------------------------------------------------
# Fuzz: random values for every flag of every script.
# ----------------------------------------------------------------------------------------------------------

_ELEMENTS = st.sampled_from(
  ["0", "-1", "1", "1.5", "2", "3", "10", "1e9", "1e-9", "nan", "inf", "x", "", "0.5:2", "2:1", "1:"]
  + list(fc.MECHANISMS)
)


def _values(flag: dict, files) -> st.SearchStrategy[str]:
  """Valid-looking and broken values for one flag, by its type (paths for path flags)."""
  name, kind = flag["name"], flag["type"]
  garbage = st.sampled_from(["", "x", " ", "1,2", "-"])
  if name in ("out", "output"):
    paths = ["new/out", "a_file", "a_file/sub", "foreign", "", "/sys/x", "new.npz"]
    return st.sampled_from([p if p in ("", "/sys/x") else str(files / p) for p in paths])
  if name in ("data_path", "source") and kind == "string":
    return st.sampled_from([str(files / p) for p in ("missing.npz", "corrupt.npz", "leaf.npz", "a_file", "")])
  if kind == "bool":
    return st.sampled_from(["true", "false", "1", "0", "maybe"])
  if kind == "int":
    return st.one_of(st.integers(-3, 300).map(str), st.sampled_from(["2147483648", "10**3", "1.5"]), garbage)
  if kind == "float":
    return st.one_of(
      st.floats(-10, 1e3).map(repr), st.sampled_from(["nan", "inf", "-inf", "1e400", "0", "1e-300"]), garbage
    )
  if kind == "enum":
    return st.one_of(st.sampled_from(flag["enum"]), garbage)
  if kind == "list":
    return st.one_of(st.lists(_ELEMENTS, max_size=4).map(",".join), st.just(flag["default"]))
  return st.one_of(st.just(flag["default"]), garbage)


# Beside TINY, what makes each script's defaults a valid small run.
_SMALL = {
  "privacy_audit.py": ["--client_examples=8"],  # the audited client holds 8 of its 16 examples
  "gradient_inversion.py": ["--epsilons=1,8"],  # 1000 needs z < 0.05 over TINY's single step
  "valuation_study.py": ["--seeds=0,1"],
}


def _base(worker: ScriptWorker, files) -> list[str]:
  """Flags of a valid small run of the worker's script, writing under ``files``."""
  base = [f for f in TINY if f.split("=")[0][2:] in worker.flags] + _SMALL.get(worker.script, [])
  if "out" in worker.flags:
    base.append(f"--out={files / 'new' / 'out'}")
  if "output" in worker.flags:
    base += [f"--source={files / 'leaf.npz'}", f"--output={files / 'new.npz'}"]
  if "clients_csv" in worker.flags:
    base.append(f"--clients_csv={files / 'clients.csv'}")
  return base


def _fuzz(worker: ScriptWorker, files, data) -> None:
  names = sorted(worker.flags)
  chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True), label="flags")
  argv = [f"--{name}={data.draw(_values(worker.flags[name], files), label=name)}" for name in chosen]
  base = _base(worker, files)
  dry = ["--dry_run"] if "dry_run" in worker.flags else []
  before = _snapshot(files)
  result = worker(*base, *argv, *dry)
  assert result.rc in (0, 2), (argv, result)
  if result.rc == 2:
    _assert_misuse(result)
    assert _snapshot(files) == before, argv  # misuse writes nothing
  elif dry:
    assert result.stdout.startswith(f"{worker.script}: "), result.stdout  # the header line comes first
    assert "dry run:" in result.stdout and _snapshot(files) == before, argv
  else:  # make_embedded_dataset.py: a complete, loadable asset
    written = next(a.split("=", 1)[1] for a in [*base, *argv][::-1] if a.startswith("--output="))
    with np.load(written) as asset:
      assert {"train_image", "test_image", "provenance"} <= set(asset.files)
    os.remove(written)


@pytest.mark.parametrize("script", SCRIPTS)
def test_fuzzed_flags_exit_2_with_one_line_or_run(workers, files, script):
  worker = workers(script)

  @settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
  @given(st.data())
  def check(data):
    _fuzz(worker, files, data)

  check()


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_fuzzed_flags_many_examples(workers, files, script):
  worker = workers(script)

  @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
  @given(st.data())
  def check(data):
    _fuzz(worker, files, data)

  check()


def test_every_script_has_its_flags_from_the_configs(workers):
  """Generated flags: a config field's flag carries its docstring help and, for enums, the allowed tuple."""
  worker = workers("compare_mechanisms.py")
  for field in ("lam", "rounds", "clip_norm", "valuation", "test_fraction", "restart_on_mismatch"):
    assert field in worker.flags  # test_fraction had no hand-written flag
  assert worker.flags["dataset"]["enum"] == list(fc.DATASETS)
  assert worker.flags["model"]["enum"] == list(fc.MODELS)
  assert worker.flags["server_optimizer"]["enum"] == list(fc.SERVER_OPTIMIZERS)
  assert worker.flags["out"]["default"] == "results/compare"


# ----------------------------------------------------------------------------------------------------------
# The reproducers of issue 12, each exiting 2 before any work.
# ----------------------------------------------------------------------------------------------------------

_REPRODUCERS = [
  ("compare_mechanisms.py", ["--mechanisms="], ["flag --mechanisms=: mechanisms is empty"]),
  ("misreporting.py", ["--mechanisms="], ["flag --mechanisms=: mechanisms is empty"]),
  ("misreporting.py", ["--factors="], ["flag --factors=: factors is empty"]),
  ("misreporting.py", ["--factors=1,0.5"], ["factors[1]=0.5 is invalid: expected a number >= 1"]),
  ("sweep_experiments.py", ["--values="], ["flag --values=: values is empty"]),
  ("sweep_games.py", ["--num_seeds=2147483648"], ["= 17179869184 games", "expected at most"]),
  ("tune_pricing.py", ["--num_clients=2147483648"], ["num_clients=2147483648 is invalid"]),
  ("sweep_experiments.py", ["--values=10,-1"], ["values[1]='-1' is invalid for --sweep=lam: lam=-1.0"]),
  ("sweep_experiments.py", ["--values=10,nan"], ["values[1]='nan'", "lam=nan is invalid"]),
  (
    "sweep_experiments.py",
    ["--sweep=num_clients", "--values=3,1"],
    ["values[1]='1' is invalid for --sweep=num_clients: num_clients=1"],
  ),
  ("privacy_audit.py", ["--epsilons="], ["flag --epsilons=: epsilons is empty"]),
  (
    "privacy_audit.py",
    ["--epsilons=1e9", "--client_examples=8"],
    ["eps[0]=1000000000.0", "noise multiplier"],
  ),
  ("privacy_audit.py", ["--trial_chunk=0", "--client_examples=8"], ["trial_chunk=0 is invalid"]),
  (
    "privacy_audit.py",
    ["--canary_label=99", "--client_examples=8"],
    ["canary_label=99 is invalid: expected", "9]"],
  ),
  ("gradient_inversion.py", ["--epsilons=1e9"], ["eps[0]=1000000000.0", "noise multiplier"]),
  ("gradient_inversion.py", ["--epsilons=1e-9", "--rounds=50"], ["eps[0]=1e-09", "noise multiplier"]),
  ("tune_pricing.py", ["--weight_spread=inf"], ["weight_spread=inf is invalid: expected a finite number"]),
  ("compare_mechanisms.py", ["--num_clients=100000"], ["num_clients=100000 is invalid", "has 285 writers"]),
  ("compare_mechanisms.py", ["--out="], ["out='' is invalid"]),
  ("compare_mechanisms.py", ["--out=/sys/x"], ["out='/sys/x' is not writable"]),
  ("compare_mechanisms.py", ["--out={files}/a_file/sub"], ["a_file' is a file, expected a folder"]),
  ("compare_mechanisms.py", ["--out={files}/a_file"], ["a_file' is a file: expected a folder"]),
  ("compare_mechanisms.py", ["--out={files}/foreign"], ["is a non-empty folder that no run wrote"]),
  ("compare_mechanisms.py", ["--restart_on_mismatch"], ["restart_on_mismatch=True needs checkpoint=True"]),
  ("compare_mechanisms.py", ["--checkpoint_every=1"], ["checkpoint_every=1 needs checkpoint_dir"]),
  ("compare_mechanisms.py", ["--rounds=0"], ["rounds=0 is invalid: expected an integer >= 1"]),
  ("compare_mechanisms.py", ["--rounds=abc"], ["flag --rounds=abc: invalid literal for int()"]),
  ("compare_mechanisms.py", ["--model=mlp"], ["flag --model=mlp: value should be one of <cnn|logreg>"]),
  ("compare_mechanisms.py", ["--min_examples=0"], ["min_examples=0 is invalid"]),  # a renamed field
  ("compare_mechanisms.py", ["--source=npz"], ["source='npz' needs data_path= a .npz file"]),
  (
    "compare_mechanisms.py",
    ["--source=npz", "--data_path={files}/corrupt.npz"],
    ["corrupt.npz' is not a readable .npz archive"],
  ),
  ("compare_mechanisms.py", ["--no_such_flag=1"], ["Unknown command line flag 'no_such_flag'"]),
  ("valuation_study.py", ["--draws=0"], ["draws=0 is invalid: expected an integer >= 1"]),
  ("valuation_study.py", ["--seeds=1,1"], ["seeds=[1, 1] is invalid: expected distinct"]),
  ("valuation_study.py", ["--draw=1"], ["Unknown command line flag 'draw'"]),  # --draws sets the draws
  ("make_embedded_dataset.py", ["--source={files}/missing.npz"], ["missing.npz' is not a file"]),
  ("make_embedded_dataset.py", ["--source={files}/corrupt.npz"], ["corrupt.npz' is not a readable .npz"]),
  ("make_embedded_dataset.py", ["--output={files}"], ["is invalid: expected an .npz file path"]),
]


@pytest.mark.parametrize(
  "script, flags, expected", _REPRODUCERS, ids=[f"{s[:-3]}:{' '.join(f)}" for s, f, _ in _REPRODUCERS]
)
def test_reproducers_exit_2_with_one_line_and_write_nothing(workers, files, script, flags, expected):
  worker = workers(script)
  base = _base(worker, files)
  before = _snapshot(files)
  started = time.monotonic()
  result = worker(*base, *(f.format(files=files) for f in flags))
  _assert_misuse(result, *(e.format(files=files) for e in expected))
  assert _snapshot(files) == before
  assert time.monotonic() - started < 60, "misuse must be caught before any work"


def test_tfds_without_data_path_is_one_line(workers, tmp_path):
  result = workers("compare_mechanisms.py")(*TINY, "--source=tfds", "--partition=iid", f"--out={tmp_path}/o")
  _assert_misuse(result, "tfds dataset 'emnist/byclass' is not available under data_dir=None")


# ----------------------------------------------------------------------------------------------------------
# Issue 22: privacy_claims, launch, tune_pricing and sweep_games as a hostile user drives them.
# ----------------------------------------------------------------------------------------------------------

_CLAIMS_HEADER = [
  *("mechanism", "client", "num_examples", "sampling_rate", "noise_multiplier", "steps", "sampler"),
  *("batch_capacity", "budget_epsilon", "epsilon_spent", "delta", "batch_size", "accountant"),
]


def _claims_row(**cells: object) -> dict[str, str]:
  """A participant row whose epsilon_spent is the accountant's (n = 64, B = 32, q = 0.5), with ``cells``."""
  row = dict(
    mechanism="stackelberg",
    client=0,
    num_examples=64,
    sampling_rate=0.5,
    noise_multiplier=1.5,
    steps=3,
    sampler="poisson",
    batch_capacity=81,
    budget_epsilon=2.0,
    delta=1e-05,
    batch_size=32,
    accountant="rdp",
  )
  row.update(cells)
  if "epsilon_spent" not in cells:
    sampler = events.Sampler(row["sampler"], row["batch_size"], row["batch_capacity"])
    row["epsilon_spent"] = _spent(float(row["noise_multiplier"]), row["num_examples"], row["steps"], sampler)
  return {k: str(v) for k, v in row.items()}


@functools.cache
def _spent(z: float, n: int, steps: int, sampler: events.Sampler) -> float:
  """What the run's ledger records (RDP at delta = 1e-5; 0 for a client that sat out)."""
  return ledger.accountant_epsilon(z, n, steps, 1e-5, sampler) if math.isfinite(z) and steps > 0 else 0.0


_SAT_OUT = dict(client=1, noise_multiplier=math.inf, steps=0, budget_epsilon=0.0)


def _write_claims(path, rows: list[dict[str, str]], header: list[str] = _CLAIMS_HEADER) -> str:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  return str(path)


def _read_table(path) -> list[dict[str, str]]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


# (edits of the first row, what the one line says): each was a traceback, a hang or a wrong result on main.
_CLAIMS_MISUSE = [
  ({"steps": 10**9}, "steps='1000000000' is invalid: expected an integer in [0, 10000000]"),
  ({"steps": "1e9"}, "steps='1e9' is invalid: expected an integer"),
  ({"steps": 2.5}, "steps='2.5' is invalid"),
  (
    {"noise_multiplier": 1e-9},
    "noise_multiplier='1e-09' is invalid: expected inf (sat out) or a number in [0.05, 100000]",
  ),
  ({"noise_multiplier": 1e23}, "noise_multiplier='1e+23' is invalid"),  # found by the fuzz below
  ({"noise_multiplier": "nan"}, "noise_multiplier='nan' is invalid"),  # was counted as a non-participant
  ({"noise_multiplier": "-inf"}, "noise_multiplier='-inf' is invalid"),
  ({"budget_epsilon": -3}, "budget_epsilon='-3' is invalid: expected a finite number >= 0"),
  ({"budget_epsilon": "inf"}, "budget_epsilon='inf' is invalid"),
  ({"budget_epsilon": 0}, "budget_epsilon=0.0 is invalid for a participant"),
  ({"epsilon_spent": -3}, "epsilon_spent='-3' is invalid: expected a finite number >= 0"),
  ({"epsilon_spent": "nan"}, "epsilon_spent='nan' is invalid"),
  ({"sampling_rate": 1.5}, "sampling_rate='1.5' is invalid: expected a number in (0, 1]"),
  ({"sampling_rate": 0}, "sampling_rate='0' is invalid: expected a number in (0, 1]"),
  (
    {"sampling_rate": 0.25},
    "sampling_rate=0.25 is invalid: expected min(1, batch_size / num_examples) = 0.5",
  ),
  ({"sampler": "uniform"}, "sampler='uniform' is invalid: expected one of ['fixed', 'poisson']"),
  ({"accountant": "gdp"}, "accountant='gdp' is invalid: expected one of ['pld', 'rdp']"),
  ({"mechanism": ""}, "mechanism='' is invalid: expected one of"),
  ({"num_examples": 0, "sampling_rate": 1.0}, "num_examples='0' is invalid: expected an integer in [1,"),
  (
    {"batch_capacity": 3},
    "batch_capacity=3 is invalid for sampler='poisson': expected an integer >= batch_size",
  ),
  ({"sampler": "fixed"}, "batch_capacity=81 is invalid for sampler='fixed': expected batch_size=32"),
  ({"delta": 1.0}, "delta='1.0' is invalid: expected a number in (0, 1)"),
  ({"client": "x"}, "client='x' is invalid: expected an integer"),
]


@pytest.mark.parametrize("edits, expected", _CLAIMS_MISUSE, ids=[str(e) for e, _ in _CLAIMS_MISUSE])
def test_privacy_claims_bad_rows_exit_2_with_one_line(workers, tmp_path, edits, expected):
  row = _claims_row()
  row.update({k: str(v) for k, v in edits.items()})  # the edit itself, verbatim
  source = _write_claims(tmp_path / "clients.csv", [_claims_row(**_SAT_OUT), row])
  result = workers("privacy_claims.py")(
    f"--clients_csv={source}", f"--out={tmp_path / 'out'}", "--progress=false"
  )
  _assert_misuse(result, "line 3: " + expected)
  assert os.listdir(tmp_path) == ["clients.csv"]


def test_privacy_claims_bad_files_exit_2_with_one_line(workers, tmp_path):
  worker = workers("privacy_claims.py")
  header = ",".join(_CLAIMS_HEADER) + "\n"
  cases = {
    "header_only.csv": (header, "has a header but no client rows"),  # said it lacked the 12 columns it has
    "empty.csv": ("", "is empty: expected a header and one row per client"),
    "no_delta.csv": (header.replace("delta,", ""), "lacks the columns ['delta']"),
    "ragged.csv": (header + "stackelberg,0,64\n", "line 2 has 3 cells: expected 13"),
  }
  for name, (text, expected) in cases.items():
    (tmp_path / name).write_text(text)
    result = worker(f"--clients_csv={tmp_path / name}", f"--out={tmp_path / 'out'}", "--progress=false")
    _assert_misuse(result, expected)
  assert not (tmp_path / "out").exists()


def test_privacy_claims_flags_a_ledger_that_disagrees_and_is_quiet(workers, tmp_path):
  """A recorded epsilon_spent beside a recomputed one that differs is flagged and counted; dp-accounting's
  convergence warnings (q = 0.32, z = 1: several per row) become one line; identical rows count once."""
  good = _claims_row()
  rows = [
    good,
    _claims_row(client=1, epsilon_spent=3.0),  # the ledger says 3, the accountant less
    _claims_row(
      client=2, num_examples=100, sampling_rate=0.32, noise_multiplier=1.0, steps=30, budget_epsilon=20.0
    ),
    _claims_row(client=3, mechanism="contract", **{k: v for k, v in _SAT_OUT.items() if k != "client"}),
    _claims_row(
      client=4, mechanism="contract", noise_multiplier="inf", steps=0, budget_epsilon=0.0, epsilon_spent=0.5
    ),  # sat out, yet records a spend
  ]
  source = _write_claims(tmp_path / "clients.csv", rows)
  result = workers("privacy_claims.py")(
    f"--clients_csv={source}", f"--out={tmp_path / 'out'}", "--progress=false"
  )
  assert result.rc == 0 and result.stderr == "", result
  assert "ledger: 2 of 5 rows record an epsilon_spent that disagrees" in result.stdout
  assert "convergence" not in result.stderr and "failed to converge' warnings silenced" in result.stdout
  claims = {row["client"]: row for row in _read_table(tmp_path / "out" / "privacy_claims.csv")}
  assert set(claims) == {"0", "1", "2", "4"}  # the participants and the sat-out row whose ledger disagrees
  assert [claims[c]["ledger_agrees"] for c in "0124"] == ["True", "False", "True", "False"]
  assert float(claims["0"]["eps_rdp"]) == pytest.approx(float(good["epsilon_spent"]), rel=1e-12)
  assert float(claims["0"]["eps_pld"]) <= float(claims["0"]["eps_rdp"])
  summary = {row["mechanism"]: row for row in _read_table(tmp_path / "out" / "privacy_summary.csv")}
  assert (
    summary["stackelberg"]["ledger_mismatches"] == "1" and summary["contract"]["ledger_mismatches"] == "1"
  )
  assert summary["stackelberg"]["participants"] == "3" and summary["contract"]["participants"] == "0"
  assert summary["contract"]["sold_eps_max"] == ""  # a statistic over no participant: empty, not NaN
  ratios = [float(r["epsilon_spent"]) / float(r["budget_epsilon"]) for r in rows[:3]]
  assert float(summary["stackelberg"]["ledger_over_sold_max"]) == pytest.approx(max(ratios), rel=1e-12)


def test_privacy_claims_many_rows_are_grouped(workers, tmp_path):
  """Was: 1e6 rows gave no output after 150 s (one accountant call per row). Identical rows are computed
  once, and a table beyond LONG_TABLE rows is written as CSV alone."""
  count = 10_001  # privacy_claims.LONG_TABLE + 1
  rows = [_claims_row(client=i % 7, steps=1 + i % 3) for i in range(3)]
  source = _write_claims(tmp_path / "clients.csv", [rows[i % 3] for i in range(count)])
  started = time.monotonic()
  result = workers("privacy_claims.py")(
    f"--clients_csv={source}", f"--out={tmp_path / 'out'}", "--progress=false"
  )
  assert result.rc == 0, result
  assert time.monotonic() - started < 120
  assert sorted(os.listdir(tmp_path / "out")) == sorted(
    ["privacy_claims.csv", *(f"privacy_summary.{x}" for x in ("csv", "json", "md")), report.MANIFEST]
  )
  claims = _read_table(tmp_path / "out" / "privacy_claims.csv")
  assert len(claims) == count and all(row["ledger_agrees"] == "True" for row in claims)


# Cells the fuzz puts in a row: valid values and every kind of broken one.
_HOSTILE = [
  "",
  "x",
  "nan",
  "inf",
  "-inf",
  "-3",
  "0",
  "1e9",
  "1e-9",
  "2.5",
  "1e400",
  "99999999999999999999999",
]
_VALID_SETUPS = [  # (sampler, num_examples, batch_size, batch_capacity): q = min(1, B / n)
  ("poisson", 64, 32, 81),
  ("poisson", 16, 32, 81),
  ("poisson", 100, 32, 33),  # B_max close to B: a large truncation charge (RDP may find no finite epsilon)
  ("fixed", 100, 32, 32),
]


@st.composite
def _fuzzed_row(draw, client: int) -> dict[str, str]:
  sampler, n, batch, capacity = draw(st.sampled_from(_VALID_SETUPS))
  z = draw(st.sampled_from(["0.8", "1.3", "4.0", "0.05", "inf"]))
  steps = draw(st.sampled_from(["0", "1", "3", "10"]))
  live = z != "inf" and steps != "0"
  row = {
    "mechanism": draw(st.sampled_from(["stackelberg", "contract"])),
    "client": str(client),
    "num_examples": str(n),
    "sampling_rate": repr(min(1.0, batch / n)),
    "noise_multiplier": z,
    "steps": steps,
    "sampler": sampler,
    "batch_capacity": str(capacity),
    "budget_epsilon": draw(st.sampled_from(["0.5", "2.0", "8.0"])) if live else "0.0",
    "epsilon_spent": draw(st.sampled_from(["0.0", "0.7", "2.5"])) if live else "0.0",
    "delta": draw(st.sampled_from(["1e-05", "0.001"])),
    "batch_size": str(batch),
    "accountant": draw(st.sampled_from(["rdp", "pld"])),
  }
  for column in draw(st.lists(st.sampled_from(_CLAIMS_HEADER), max_size=2, unique=True)):
    row[column] = draw(st.sampled_from(_HOSTILE))
  return row


def _fuzz_claims(worker: ScriptWorker, tmp_path, data, counter: list[int]) -> tuple[int, int]:
  """One fuzzed file: exit 2 with one line and nothing written, or complete tables with no NaN, an inf
  only where the row's note says the accountant found no finite epsilon, and consistent counts."""
  count = data.draw(st.integers(1, 4), label="rows")
  rows = [data.draw(_fuzzed_row(i), label=f"row {i}") for i in range(count)]
  counter[0] += 1
  source = _write_claims(tmp_path / f"clients_{counter[0]}.csv", rows)
  out = tmp_path / f"out_{counter[0]}"
  result = worker(f"--clients_csv={source}", f"--out={out}", "--progress=false")
  assert result.rc in (0, 2), (rows, result)
  if result.rc == 2:
    _assert_misuse(result, "clients_csv=")
    assert not out.exists()
    return count, 2
  claims = _read_table(out / "privacy_claims.csv")
  summary = _read_table(out / "privacy_summary.csv")
  for table in (claims, summary):
    for row in table:
      assert not any(v.lower() == "nan" for v in row.values()), row
  for row in claims:
    if any(v == "inf" for k, v in row.items() if k != "noise_multiplier"):
      assert "no finite epsilon" in row["note"], row
  for path in (out / "privacy_claims.json", out / "privacy_summary.json"):
    text = path.read_text()
    assert "NaN" not in text, path
    json.loads(text)  # valid (Infinity as Python's json writes it)
  by_mechanism = {row["mechanism"]: row for row in summary}
  for mech, row in by_mechanism.items():
    mine = [r for r in rows if r["mechanism"] == mech]
    live = [r for r in mine if float(r["noise_multiplier"]) < math.inf and int(r["steps"]) > 0]
    assert int(row["participants"]) == len(live)
    flagged = [r for r in claims if r["mechanism"] == mech and r["ledger_agrees"] == "False"]
    assert int(row["ledger_mismatches"]) == len(flagged)
  return count, 0


@pytest.mark.parametrize(
  "examples", [pytest.param(50, id="50"), pytest.param(250, marks=pytest.mark.slow, id="250")]
)
def test_privacy_claims_fuzzed_rows(workers, tmp_path, examples):
  """Property: for any file of 1-4 rows, valid or broken in up to two cells per row, exit 0 or 2, no
  traceback, no NaN in any output, every inf explained (100+ rows in the default run)."""
  worker, counter, rows, codes = workers("privacy_claims.py"), [0], [0], []

  @settings(max_examples=examples, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
  @given(st.data())
  def check(data):
    count, rc = _fuzz_claims(worker, tmp_path, data, counter)
    rows[0] += count
    codes.append(rc)

  check()
  assert rows[0] >= 2 * examples  # 1-4 rows per file
  assert codes.count(0) >= len(codes) // 5 and codes.count(2) >= len(codes) // 5, codes  # both paths


_GAME_MISUSE = [
  (
    "tune_pricing.py",
    ["--num_clients=2"],
    ["price_groups=4 is invalid for num_clients=2: expected an integer in [1, 2] (every price group needs"],
  ),
  ("tune_pricing.py", ["--eps_max=1e-6"], ["eps_min=1.0 > eps_max=1e-06: expected eps_min <= eps_max"]),
  # Was accepted, with eps_min silently lowered to 1e-6: the same rule as tune_pricing now.
  ("sweep_games.py", ["--eps_maxes=8,1e-6"], ["eps_min=1.0 > eps_maxes[1]=1e-06: expected eps_min <= every"]),
]


def test_game_scripts_refuse_what_they_cannot_run(workers, files):
  for script, flags, expected in _GAME_MISUSE:
    worker = workers(script)
    before = _snapshot(files)
    _assert_misuse(worker(*_base(worker, files), *flags), *expected)
    assert _snapshot(files) == before
  worker = workers("sweep_games.py")  # --eps_min lowered with the caps: accepted
  result = worker(*_base(worker, files), "--eps_min=1e-6", "--eps_maxes=8,1e-6", "--num_seeds=1", "--dry_run")
  assert result.rc == 0 and "eps_min=1e-06" in result.stdout, result


def test_tune_pricing_with_no_optimal_payment_has_an_error_column(workers, tmp_path):
  """Was: ZeroDivisionError (tuned_payment / R*) when lam is so small that R* = 0."""
  worker = workers("tune_pricing.py")
  out = tmp_path / "tune"
  flags = ["--valuation=log", "--num_clients=3", "--price_groups=1", "--steps=2", "--lam=1e-9"]
  result = worker(*flags, "--grid_points=4", f"--out={out}", "--progress=false")
  assert result.rc == 0, result
  summary = json.loads((out / "summary.json").read_text())
  assert summary["closed_form_payment"] == 0.0 and summary["tuned_payment_relative_error"] is None
  assert summary["tuned_payment_error"] == pytest.approx(summary["tuned_payment"]) and math.isfinite(
    summary["tuned_payment_error"]
  )


def test_sweep_games_help_shows_the_cost_range_format():
  proc = subprocess.run(
    [sys.executable, "scripts/sweep_games.py", "--helpfull"],
    cwd=REPO,
    env=env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  help_text = proc.stdout + proc.stderr
  assert "(default: '0.5:2,1:1.5')" in help_text, help_text[-3000:]
  assert "(0.5, 2.0)" not in help_text


# Runs launch.py's own parser and main in one process, once per command line (no app.run: its --helpfull
# would be defined twice); prints [{"rc", "stderr"}].
_LAUNCH_DRIVER = """
import contextlib, io, json, sys
sys.path.insert(0, "scripts")
import launch
from absl import flags
results = []
for argv in json.loads(sys.argv[1]):
  flags.FLAGS.unparse_flags()
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:
      launch.main(launch._parse(["launch.py", *argv]))
      rc = 0
    except SystemExit as exit_:
      rc = exit_.code
  results.append({"rc": rc, "stderr": err.getvalue()})
print(json.dumps(results))
"""


def test_launch_checks_its_arguments_and_the_command_before_starting(tmp_path):
  """Each of these was a traceback (FileExistsError, FileNotFoundError) or exit 1 with two lines."""
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  logs = f"--logs={tmp_path / 'logs'}"
  cases = [
    ([f"--logs={a_file}", "--", "true"], f"logs='{a_file}' is a file: expected a folder"),
    ([f"--logs={a_file}/sub", "--", "true"], "is not writable"),
    ([logs, "--", "/nonexistent/binary"], "command '/nonexistent/binary' was not found"),
    (
      [logs, "--num_processes=2", "python", "-c", "pass"],
      "'python' is not a flag of launch.py: expected the",
    ),
    ([logs, "--num_processes=2.5", "--", "true"], "flag --num_processes=2.5"),
    ([logs, "--num_processes=0", "--", "true"], "num_processes=0 is invalid"),
    ([logs, "--num_processes=5000", "--", "true"], "num_processes=5000 is invalid"),
    ([logs, "--timeout_s=nan", "--", "true"], "timeout_s=nan is invalid"),
    ([logs, "--num_processes=2"], "the command is missing: expected it after --"),
  ]
  runs = [argv for argv, _ in cases] + [[logs, "--num_processes=2", "--", "true"]]
  proc = subprocess.run(
    [sys.executable, "-c", _LAUNCH_DRIVER, json.dumps(runs)],
    cwd=REPO,
    env=env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.splitlines()[-1])
  for (argv, expected), result in zip(cases, results):
    assert result["rc"] == 2, (argv, result)
    assert result["stderr"].startswith("error: ") and result["stderr"].count("\n") == 1, (argv, result)
    assert expected in result["stderr"], (argv, result)
  assert results[-1] == {"rc": 0, "stderr": ""}  # the good launch, after every refusal
  assert sorted(os.listdir(tmp_path / "logs")) == ["process_0.log", "process_1.log"]
  assert sorted(os.listdir(tmp_path)) == ["a_file", "logs"]  # the refusals created nothing


# ----------------------------------------------------------------------------------------------------------
# Whole runs: the header line, quiet logs, all-or-nothing outputs, resume through the command line.
# ----------------------------------------------------------------------------------------------------------


def test_a_run_prints_the_header_first_logs_nothing_and_writes_every_table(tmp_path):
  """A fresh process, as a user starts it: no libtpu / absl line, the header states the real run."""
  out = tmp_path / "out"
  proc = subprocess.run(
    [sys.executable, "scripts/compare_mechanisms.py", *TINY, "--mechanisms=social_optimum", f"--out={out}"],
    cwd=REPO,
    env=env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr == "", proc.stderr  # no "Unable to initialize backend 'tpu'", no absl INFO lines
  header = proc.stdout.splitlines()[0]
  assert header.startswith("compare_mechanisms.py: 4 clients (") and "model logreg, 1 rounds" in header
  expected = {"comparison.csv", "comparison.json", "comparison.md", "history.csv", "clients.csv"}
  expected |= {"accuracy_per_round.png", "utilities.png", "participation.png", report.MANIFEST}
  assert set(os.listdir(out)) == expected
  manifest = json.loads((out / report.MANIFEST).read_text())
  assert set(manifest["files"]) == expected - {report.MANIFEST}
  assert manifest["setup"]["federated"]["rounds"] == 1
  assert os.listdir(tmp_path) == ["out"]  # no staging folder, no temporary file left


@pytest.mark.slow
def test_resume_through_the_command_line(tmp_path):
  """--checkpoint --checkpoint_every=1 works; a rerun with --lam=5 or --rounds=3 refuses; a corrupt newest
  step is set aside and the run finishes as if uninterrupted; --restart_on_mismatch starts fresh."""
  worker = ScriptWorker("compare_mechanisms.py")
  try:
    run = [*TINY, "--rounds=2", "--mechanisms=stackelberg", "--checkpoint", "--checkpoint_every=1"]
    first = worker(*run, f"--out={tmp_path / 'a'}")
    assert first.rc == 0, first
    ckpt = tmp_path / "a.checkpoints" / "stackelberg"
    assert sorted(os.listdir(ckpt)) == ["1", "2"]
    for change, what in (("--lam=5", "game.lam 50.0 -> 5.0"), ("--rounds=3", "federated.rounds 2 -> 3")):
      _assert_misuse(worker(*run, change, f"--out={tmp_path / 'a'}"), f"holds another run ({what}")
    reference = (tmp_path / "a" / "comparison.csv").read_text()
    for name in os.listdir(ckpt / "2" / "state"):  # damage the newest step
      if name == "_METADATA":
        (ckpt / "2" / "state" / name).write_text("{")
    again = worker(*run, f"--out={tmp_path / 'a'}")
    assert again.rc == 0, again
    assert sorted(os.listdir(ckpt)) == ["1", "2", "2.set-aside"]

    def results(text: str) -> list[dict]:  # every column but the wall time
      return [
        {k: v for k, v in row.items() if k != "wall_time_s"} for row in csv.DictReader(io.StringIO(text))
      ]

    assert results((tmp_path / "a" / "comparison.csv").read_text()) == results(reference)
    fresh = worker(*run, "--lam=5", "--restart_on_mismatch", f"--out={tmp_path / 'a'}")
    assert fresh.rc == 0, fresh
    assert (tmp_path / "a.checkpoints" / "stackelberg.other-run").is_dir()
  finally:
    worker.close()


@pytest.mark.slow
def test_a_sweep_into_a_used_folder_replaces_it_whole(tmp_path):
  worker = ScriptWorker("sweep_experiments.py")
  try:
    out = f"--out={tmp_path / 'sweep'}"
    common = [*TINY, "--mechanisms=stackelberg", out]
    assert worker(*common, "--sweep=lam", "--values=10,50").rc == 0
    assert (tmp_path / "sweep" / "test_accuracy_vs_lam.png").exists()
    result = worker(*common, "--sweep=cost_high", "--values=2,3")
    assert result.rc == 0, result
    files = set(os.listdir(tmp_path / "sweep"))
    assert "test_accuracy_vs_cost_high.png" in files and not [f for f in files if "_vs_lam" in f]
    assert {"comparison.csv", "history.csv", "clients.csv"} <= files
    history = (tmp_path / "sweep" / "history.csv").read_text().splitlines()
    assert history[0].startswith("cost_high,mechanism,round") and len(history) == 1 + 2 * 1
  finally:
    worker.close()


def test_make_embedded_dataset_writes_atomically(tmp_path, monkeypatch):
  """A kill mid-write used to leave the asset at 0 bytes: the archive is built in memory and renamed over."""
  script = import_script("make_embedded_dataset.py")
  _leaf_source(tmp_path / "leaf.npz")
  arrays = script.build_arrays(script.read_source(tmp_path / "leaf.npz"), "0" * 64)
  asset = tmp_path / "asset.npz"
  asset.write_bytes(b"the previous asset")

  def killed(*_):
    raise KeyboardInterrupt  # as if the process died just before the rename

  monkeypatch.setattr(os, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    script.write_npz(asset, arrays)
  assert asset.read_bytes() == b"the previous asset"
  assert sorted(os.listdir(tmp_path)) == ["asset.npz", "leaf.npz"]  # no temporary file either
  monkeypatch.undo()
  script.write_npz(asset, arrays)
  with zipfile.ZipFile(io.BytesIO(asset.read_bytes())) as archive:
    assert "train_image.npy" in archive.namelist()


def test_checkpoint_with_checkpoint_every_is_accepted(workers, tmp_path):
  """Was: --checkpoint --checkpoint_every=1 exited 2 ('needs checkpoint_dir')."""
  worker = workers("compare_mechanisms.py")
  result = worker(*TINY, "--checkpoint", "--checkpoint_every=1", f"--out={tmp_path / 'o'}", "--dry_run")
  assert result.rc == 0, result
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# three_party at small N: the flag's range is checked; a market that cannot form says so in its row.
# ----------------------------------------------------------------------------------------------------------


def test_three_party_aggregators_above_half_the_clients_exit_2_and_a_missing_market_is_a_note(
  workers, tmp_path
):
  worker = workers("compare_mechanisms.py")
  refused = worker(*TINY, "--num_clients=8", "--num_aggregators=5", f"--out={tmp_path / 'r'}", "--dry_run")
  _assert_misuse(refused, "num_aggregators=5 is invalid with num_clients=8", "[1, 4]")
  out = tmp_path / "o"
  result = worker(*TINY, "--num_clients=2", "--mechanisms=three_party,posted_price", f"--out={out}")
  assert result.rc == 0, result
  text = (out / "comparison.csv").read_text()
  assert "inf" not in text.lower() and "nan" not in text.lower(), text
  rows = {row["mechanism"]: row for row in csv.DictReader(io.StringIO(text))}
  assert rows["three_party"]["participants"] == "0"
  assert rows["three_party"]["note"].startswith("no market: three_party has one aggregator at N=2")
  assert rows["three_party"]["server_utility"] == ""  # -inf under 'dp': no trained model to value
  assert float(rows["three_party"]["test_accuracy"]) >= 0.0
  assert rows["posted_price"]["note"] == "" or rows["posted_price"]["participants"] == "0"
