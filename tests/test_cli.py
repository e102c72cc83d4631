"""The scripts as a hostile user drives them (issue 12): every flag fuzzed, every reproducer under test.

Misuse must end with exit status 2, one line ``error: ...`` naming the flag or value and what is allowed,
no traceback, and nothing written; a run either writes its whole output folder or nothing. The scripts
run in tests/cli_worker.py processes (one per script, many command lines each).
"""

from __future__ import annotations

import csv
import io
import json
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
