"""Crash-safe result writers, table formatting and the timer."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import time

import jax.numpy as jnp
import numpy as np
import pytest

from fcfn_jax import plotting
from fcfn_jax.report import (
  MANIFEST,
  ResultsFolder,
  Timer,
  check_output_folder,
  format_table,
  markdown_table,
  write_csv_atomic,
  write_json_atomic,
  write_results,
  write_text_atomic,
)
from fcfn_jax.validate import ConfigError

ROWS = [
  {"mechanism": "stackelberg", "utility": np.float32(3.14159), "participants": 12},
  {"mechanism": "posted_price", "utility": jnp.asarray(-0.5), "participants": np.int64(7), "note": "a|b"},
]


@pytest.fixture
def removed_temp_files(monkeypatch):
  """(path, size) of every temp file the writers remove: proof that the failure hit mid-write."""
  removed, remove = [], os.remove

  def spy(path):
    removed.append((os.path.basename(path), os.path.getsize(path)))
    remove(path)

  monkeypatch.setattr(os, "remove", spy)
  return removed


class _Interrupt:
  """Serializes like an array until the user hits Ctrl-C midway through the write."""

  def tolist(self):
    raise KeyboardInterrupt


def test_write_json_atomic_roundtrip_and_overwrite(tmp_path):
  path = tmp_path / "results.json"
  write_json_atomic(path, {"old": True})
  obj = {"rows": ROWS, "budgets": np.arange(3, dtype=np.float32), "nan": float("nan"), "none": None}
  write_json_atomic(path, obj)
  loaded = json.loads(path.read_text())
  assert loaded["rows"][0] == {
    "mechanism": "stackelberg",
    "utility": pytest.approx(3.14159, rel=1e-6),
    "participants": 12,
  }
  assert loaded["rows"][1]["utility"] == -0.5 and loaded["rows"][1]["participants"] == 7
  assert loaded["budgets"] == [0.0, 1.0, 2.0] and np.isnan(loaded["nan"]) and loaded["none"] is None
  assert "old" not in loaded
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
  assert os.listdir(tmp_path) == ["results.json"]


@pytest.mark.parametrize(
  "bad, error",
  [
    (object(), ConfigError),  # unserializable value after part of the document is written
    (_Interrupt(), KeyboardInterrupt),
  ],
)
def test_write_json_atomic_failure_keeps_old_file(tmp_path, removed_temp_files, bad, error):
  path = tmp_path / "results.json"
  write_json_atomic(path, {"round": 1})
  with pytest.raises(error, match="is not JSON-serializable: expected" if error is ConfigError else None):
    write_json_atomic(path, {"round": 2, "history": list(range(1000)) + [bad]})
  assert json.loads(path.read_text()) == {"round": 1}
  assert os.listdir(tmp_path) == ["results.json"]  # no temp file left behind
  [(name, size)] = removed_temp_files
  assert name.startswith(".results.json.") and size > 1000


def test_write_csv_atomic_roundtrip(tmp_path):
  path = tmp_path / "rounds.csv"
  write_csv_atomic(path, ROWS)
  with open(path, newline="") as f:
    lines = list(csv.DictReader(f))
  assert list(lines[0]) == ["mechanism", "utility", "participants", "note"]  # union, first-seen order
  assert float(lines[0]["utility"]) == pytest.approx(3.14159, rel=1e-6)
  assert lines[0]["note"] == "" and lines[1]["note"] == "a|b" and lines[1]["participants"] == "7"
  write_csv_atomic(path, ROWS, columns=["participants", "mechanism", "utility", "note"])
  assert path.read_text().splitlines()[0] == "participants,mechanism,utility,note"
  write_csv_atomic(path, [], columns=["round"])
  assert path.read_text().splitlines() == ["round"]


def test_write_csv_atomic_failure_keeps_old_file(tmp_path, removed_temp_files):
  path = tmp_path / "rounds.csv"
  write_csv_atomic(path, ROWS)
  before = path.read_bytes()
  rows = [{"round": r} for r in range(1000)] + [{"round": 1000, "extra": 1}]
  with pytest.raises(ConfigError, match=r"rows\[1000\] has keys \['extra'\] outside columns=\['round'\]"):
    write_csv_atomic(path, rows, columns=["round"])
  with pytest.raises(ConfigError, match=r"rows\[1\]=3 is invalid: expected a dict"):
    write_csv_atomic(path, [{"round": 1}, 3])
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["rounds.csv"]
  # Only the first failure had a temp file: a non-dict row is rejected before anything is written.
  [(_, size)] = removed_temp_files
  assert size > 1000


def test_write_results_writes_csv_json_and_markdown(tmp_path):
  rows = [{"name": "a", "value": 1.5}, {"name": "b", "value": 2.25}]
  out = tmp_path / "new_folder"
  write_results(out, "table", rows, ["value", "name"], {"setup": {"seed": 0}})
  with open(out / "table.csv", newline="") as f:
    assert f.readline().strip() == "value,name"
    assert list(csv.DictReader(f, fieldnames=["value", "name"])) == [
      {"value": "1.5", "name": "a"},
      {"value": "2.25", "name": "b"},
    ]
  assert json.loads((out / "table.json").read_text()) == {"setup": {"seed": 0}, "rows": rows}
  assert (out / "table.md").read_text() == markdown_table(rows, ["value", "name"]) + "\n"
  write_results(out, "bare", rows)
  assert json.loads((out / "bare.json").read_text()) == rows


def test_format_table_aligns_numbers_right_and_text_left():
  assert format_table(ROWS).splitlines() == [
    "mechanism     utility  participants  note",
    "------------  -------  ------------  ----",
    "stackelberg     3.142            12",
    "posted_price     -0.5             7  a|b",
  ]
  assert format_table(ROWS, columns=["utility"], floatfmt=".2e").splitlines() == [
    "  utility",
    "---------",
    " 3.14e+00",
    "-5.00e-01",
  ]
  assert format_table([], columns=["round", "accuracy"]) == "round  accuracy\n-----  --------"


def test_markdown_table():
  assert markdown_table(ROWS, floatfmt=".2f").splitlines() == [
    "| mechanism | utility | participants | note |",
    "| --- | ---: | ---: | --- |",
    "| stackelberg | 3.14 | 12 |  |",
    "| posted_price | -0.50 | 7 | a\\|b |",
  ]


def test_table_bad_floatfmt():
  with pytest.raises(ConfigError, match=r"floatfmt='q' is invalid: expected a float format spec"):
    format_table(ROWS, floatfmt="q")


def test_timer():
  with Timer() as timer:
    time.sleep(0.02)
    running = timer.elapsed
  done = timer.elapsed
  assert 0.02 <= running <= done
  assert timer.elapsed == done  # frozen once the block exits
  with pytest.raises(ConfigError, match="the timer was never entered"):
    _ = Timer().elapsed


# ----------------------------------------------------------------------------------------------------------
# ResultsFolder: a run's outputs all-or-nothing; a used folder replaced whole; foreign folders refused.
# ----------------------------------------------------------------------------------------------------------


def test_results_folder_is_written_whole_and_replaces_an_earlier_run(tmp_path):
  out = tmp_path / "runs" / "a"
  with ResultsFolder(out, manifest={"script": "x.py", "setup": {"lam": 5}}) as folder:
    folder.table("comparison", [{"mechanism": "m", "u": 1.0, "extra": 2}], ["mechanism", "u"])
    folder.csv("history", [{"round": 1}])
    write_text_atomic(folder.file("notes.txt"), "hi")
    assert not out.exists()  # nothing visible until the run ends
  assert sorted(os.listdir(out)) == sorted(
    ["comparison.csv", "comparison.json", "comparison.md", "history.csv", "notes.txt", MANIFEST]
  )
  assert (out / "comparison.csv").read_text().splitlines()[0] == "mechanism,u,extra"  # md columns first
  manifest = json.loads((out / MANIFEST).read_text())
  assert manifest["setup"] == {"lam": 5} and manifest["script"] == "x.py"
  assert manifest["files"]["notes.txt"]["bytes"] == 2
  with ResultsFolder(out) as folder:  # a second run into the same folder, writing other files
    folder.json("summary", {"ok": True})
  assert sorted(os.listdir(out)) == ["manifest.json", "summary.json"]  # no file of the first run outlives it
  assert sorted(os.listdir(tmp_path / "runs")) == ["a"]  # no staging or replaced folder left


def test_a_failed_run_leaves_nothing_not_even_the_folders_it_created(tmp_path):
  out = tmp_path / "new" / "deeper" / "out"
  with pytest.raises(RuntimeError), ResultsFolder(out) as folder:
    folder.csv("history", [{"round": 1}])
    raise RuntimeError("the run failed after writing")
  assert os.listdir(tmp_path) == []
  earlier = tmp_path / "earlier"
  with ResultsFolder(earlier) as folder:
    folder.csv("history", [{"round": 1}])
  with pytest.raises(RuntimeError), ResultsFolder(earlier) as folder:
    folder.csv("other", [{"round": 2}])
    raise RuntimeError("fails")
  assert sorted(os.listdir(earlier)) == ["history.csv", MANIFEST]  # the earlier run's folder is intact
  assert os.listdir(tmp_path) == ["earlier"]


def test_an_uncommitted_folder_is_written_elsewhere_and_removed(tmp_path):
  """commit=False: what the processes other than 0 of a multi-process run write (the same results)."""
  out = tmp_path / "runs" / "a"
  with ResultsFolder(out, commit=False) as folder:
    folder.csv("history", [{"round": 1}])
    staging = folder.folder
    assert os.listdir(staging) == ["history.csv"] and not staging.startswith(str(tmp_path))
  assert not os.path.exists(staging)
  assert os.listdir(tmp_path) == []  # out and its parents untouched


def test_stale_staging_folders_of_dead_processes_are_removed(tmp_path):
  dead = subprocess.Popen(["true"])
  dead.wait()
  stale = tmp_path / f".out.partial-{dead.pid}-abc"
  stale.mkdir()
  (stale / "comparison.csv").write_text("half")
  live = tmp_path / f".out.partial-{os.getpid()}-xyz"  # a run still going: left alone
  live.mkdir()
  with ResultsFolder(tmp_path / "out") as folder:
    folder.csv("history", [{"round": 1}])
  assert sorted(os.listdir(tmp_path)) == [live.name, "out"]


@pytest.mark.parametrize(
  "make, message",
  [
    (lambda p: "", r"out='' is invalid: expected a path"),
    (lambda p: (p / "f").write_text("") or p / "f", r"out='.*/f' is a file: expected a folder"),
    (lambda p: (p / "f").write_text("") or p / "f" / "sub", r"'.*/f' is a file, expected a folder"),
    (
      lambda p: (p / "mine").mkdir() or (p / "mine" / "thesis.tex").write_text("") or p / "mine",
      r"out='.*/mine' is a non-empty folder that no run wrote \(no manifest.json\)",
    ),
    (lambda p: "/proc/out", r"out='/proc/out' is not writable: cannot create folders in '/proc'"),
  ],
  ids=["empty", "a_file", "under_a_file", "foreign_folder", "unwritable"],
)
def test_output_folders_a_run_may_not_write(tmp_path, make, message):
  out = make(tmp_path)
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(ConfigError, match=message):
    check_output_folder(out)
  assert sorted(os.listdir(tmp_path)) == before  # checking writes nothing


def test_plots_leave_no_temporary_file_when_drawing_fails(tmp_path, monkeypatch):
  plotting.bars([{"mechanism": "m", "u": 1.0}], ["u"], tmp_path / "ok.png", "t")
  assert os.listdir(tmp_path) == ["ok.png"]
  monkeypatch.setattr(plotting.plt.Figure, "savefig", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
  with pytest.raises(OSError):
    plotting.bars([{"mechanism": "m", "u": 1.0}], ["u"], tmp_path / "bad.png", "t")
  assert os.listdir(tmp_path) == ["ok.png"]  # was: bad.png.tmp.png left behind
