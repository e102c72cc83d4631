"""The README's default table, generated from the default command's output, and its study summary,
generated from the study's tables in docs/results (never edited by hand).

  python scripts/compare_mechanisms.py --out=results/default
  python scripts/readme_table.py --update     # docs/default_comparison.json + the README block from it
  python scripts/readme_table.py --update_study   # only the study block, from docs/results
  python scripts/readme_table.py              # exit 0 iff the README blocks are their sources' rendering

--update reads --comparison (a results folder, or its comparison.json / comparison.csv; the folder's
manifest.json must show the default command: no flag but --out and --progress), writes the snapshot
docs/default_comparison.json (every row as the run wrote it, the command, the commit and the machine) and
rewrites the README between the two marker comments with :func:`render` of that snapshot: one line saying
what produced it, then the markdown table of :data:`COLUMNS` in the run's own number format (``.4g``). It
also rewrites the header line the README quotes (``compare_mechanisms.py: ...``) with what the main
command prints first (from its ``--dry_run``: seconds, nothing trained).
tests/test_readme.py checks that the README block is the snapshot's rendering and (slow) that a fresh
default run reproduces the snapshot: the game columns exactly as printed, the accuracies within
:data:`ACCURACY_TOLERANCE`.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags

from fcfn_jax import report, simulation, validate

import sim_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = "scripts/compare_mechanisms.py"
BEGIN = "<!-- readme_table.py: begin (generated from docs/default_comparison.json; do not edit) -->"
END = "<!-- readme_table.py: end -->"
# The README's short table: label, the game's outcome, the trained models' accuracy.
COLUMNS = (
  "label",
  "participants",
  "mean_epsilon",
  "total_payment",
  "server_utility",
  "social_welfare",
  "average_utility",
  "test_accuracy",
  "redundant_accuracy_loss",
)
# The game's columns: host-side solvers, reproduced exactly as printed.
GAME_COLUMNS = simulation.GAME_COLUMNS
# Trained-model columns: |fresh - snapshot| allowed (test_accuracy: 0.005 = 18 of the 3,534 test images;
# the loss is a difference of two accuracies).
ACCURACY_TOLERANCE = {"test_accuracy": 0.005, "redundant_accuracy_loss": 0.01}
FLOATFMT = ".4g"  # compare_mechanisms.py's table format (report.format_table / markdown_table)
_HARMLESS_FLAGS = ("--out=", "--progress", "--noprogress")  # flags that leave the results unchanged
STUDY_BEGIN = "<!-- readme_table.py: study begin (generated from docs/results; do not edit) -->"
STUDY_END = "<!-- readme_table.py: study end -->"
# The study's settings the README summarizes (docs/RESULTS.md sections 1-4), with their descriptions.
STUDY_SETTINGS = {
  "femnist_logreg": "FEMNIST digits, logreg, 40 writers",
  "femnist62_cnn": "FEMNIST-62, CNN, 40 writers",
  "cifar10_dirichlet_cnn": "CIFAR-10, CNN, 40 Dirichlet(0.5) clients",
  "scaling_n5000": "FEMNIST-62, logreg, 5,000 clients, lambda = 50 N / 40",
  "scaling_fixed_lambda_n5000": "FEMNIST-62, logreg, 5,000 clients, lambda = 50",
}

COMPARISON = flags.DEFINE_string(
  "comparison", "results/default", "The default command's results folder, or its comparison.{json,csv}."
)
UPDATE = flags.DEFINE_bool("update", False, "Write the snapshot and the README block from --comparison.")
README = flags.DEFINE_string("readme", os.path.join(REPO, "README.md"), "The README holding the block.")
UPDATE_STUDY = flags.DEFINE_bool(
  "update_study", False, "Rewrite only the README's study block from --results_dir (no default run needed)."
)
RESULTS_DIR = flags.DEFINE_string(
  "results_dir", os.path.join(REPO, "docs", "results"), "The study's tables the README's study block renders."
)
SNAPSHOT = flags.DEFINE_string(
  "snapshot", os.path.join(REPO, "docs", "default_comparison.json"), "The snapshot the block renders."
)
COMMIT = flags.DEFINE_string("commit", None, "Commit the run used (default: git rev-parse --short HEAD).")
MACHINE = flags.DEFINE_string("machine", None, "Machine the run used (default: this one, described).")


def _cell(text: str) -> Any:
  """A CSV cell as the JSON would hold it: None when empty, else :func:`report.csv_value`."""
  return None if text == "" else report.csv_value(text)


def load_rows(path: str) -> list[dict[str, Any]]:
  """The rows of a comparison: ``path`` is a results folder (its comparison.json) or the .json / .csv."""
  if os.path.isdir(path):
    path = os.path.join(path, "comparison.json")
  validate.require(os.path.isfile(path), f"comparison={path!r} is invalid: expected comparison.json or .csv")
  if path.endswith(".csv"):
    with open(path, newline="") as f:
      return [{key: _cell(value) for key, value in row.items()} for row in csv.DictReader(f)]
  with open(path) as f:
    rows = json.load(f)
  rows = rows["rows"] if isinstance(rows, Mapping) else rows
  validate.require(
    isinstance(rows, list) and all(isinstance(r, Mapping) for r in rows),
    f"comparison={path!r} is invalid: expected a list of rows",
  )
  return [dict(row) for row in rows]


HEADER = re.compile(r"^compare_mechanisms\.py: .*$", flags=re.M)  # the header line the README quotes


def header_line() -> str:
  """The first line the main command prints (its ``--dry_run``, run in an empty folder: nothing written)."""
  with tempfile.TemporaryDirectory() as empty:
    result = subprocess.run(
      [sys.executable, os.path.join(REPO, SCRIPT), "--dry_run", "--out=results/default"],
      cwd=empty,
      capture_output=True,
      text=True,
      check=True,
      env=dict(os.environ, PYTHONPATH=REPO),
    )
  return result.stdout.splitlines()[0]


def replace_header(readme: str, line: str) -> str:
  """``readme`` with its one quoted header line replaced by ``line``."""
  validate.require(len(HEADER.findall(readme)) == 1, "the README is invalid: expected one quoted header line")
  return HEADER.sub(lambda _: line, readme)


def main_command(out: str) -> str:
  """The README's main command, writing into ``out``."""
  return f"python {SCRIPT} --out={out}"


def recorded_command(manifest_path: str) -> str:
  """The command line a results folder's manifest records, refused unless it is the main command."""
  with open(manifest_path) as f:
    argv = json.load(f)["argv"]
  validate.require(
    os.path.basename(argv[0]) == os.path.basename(SCRIPT),
    f"manifest {manifest_path!r} is invalid: written by {argv[0]!r}, expected {SCRIPT}",
  )
  extra = [a for a in argv[1:] if not a.startswith(_HARMLESS_FLAGS)]
  validate.require(not extra, f"manifest {manifest_path!r} is invalid: flags {extra} change the default run")
  return " ".join(["python", SCRIPT, *argv[1:]])


def describe_machine() -> str:
  """This machine: CPU model and count (``benchmarks/common.machine``, what the benchmarks record), OS,
  Python, JAX and its default device."""
  import jax  # noqa: PLC0415  (only where the machine is described)

  path = os.path.join(REPO, "benchmarks", "common.py")
  spec = importlib.util.spec_from_file_location("benchmarks_common", path)
  common = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(common)
  info = common.machine()
  device = jax.devices()[0]
  return (
    f"{info['cpu']}, {info['cpu_cores']} CPUs, {platform.system()}, Python {platform.python_version()}, "
    f"jax {info['jax']} on {device.platform} ({device.device_kind})"
  )


def head_commit() -> str:
  """``git rev-parse --short HEAD`` of the repository, with ``+changes`` when the work tree differs."""
  git = ["git", "-C", REPO]
  commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
  dirty = subprocess.run(
    [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
  )
  return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def render(snapshot: Mapping[str, Any]) -> str:
  """The README block (between the markers): what produced the table, then the table of :data:`COLUMNS`."""
  return "\n".join(
    [
      f"Produced by `{snapshot['command']}` at commit `{snapshot['commit']}` on {snapshot['machine']}; "
      "the table is `docs/default_comparison.json` as `python scripts/readme_table.py --update` renders it.",
      "",
      report.markdown_table(snapshot["rows"], COLUMNS, FLOATFMT),
    ]
  )


def block(readme: str, begin: str = BEGIN, end: str = END) -> str:
  """The text between the README's markers (exclusive, without the surrounding newlines)."""
  validate.require(
    readme.count(begin) == 1 and readme.count(end) == 1 and readme.index(begin) < readme.index(end),
    f"the README is invalid: expected one {begin!r} followed by one {end!r}",
  )
  return readme[readme.index(begin) + len(begin) : readme.index(end)].strip("\n")


def replace_block(readme: str, text: str, begin: str = BEGIN, end: str = END) -> str:
  """``readme`` with the text between its markers replaced by ``text``."""
  block(readme, begin, end)
  return readme[: readme.index(begin) + len(begin)] + "\n" + text + "\n" + readme[readme.index(end) :]


def study_accuracy(results_dir: str, setting: str) -> list[dict[str, Any]]:
  """The rows of ``<results_dir>/<folder>/<setting>_accuracy.csv`` (the study's accuracy table; the folder
  is the setting's own or its group's)."""
  found = sorted(
    os.path.join(results_dir, folder, f"{setting}_accuracy.csv")
    for folder in os.listdir(results_dir)
    if os.path.isfile(os.path.join(results_dir, folder, f"{setting}_accuracy.csv"))
  )
  validate.require(
    len(found) == 1,
    f"results_dir={results_dir!r} is invalid: expected one {setting}_accuracy.csv, found {found}",
  )
  with open(found[0], newline="") as f:
    return list(csv.DictReader(f))


def render_study(results_dir: str) -> str:
  """The README's study block: per setting of :data:`STUDY_SETTINGS`, each mechanism's final test accuracy
  (mean +- 95% CI half-width over seeds) as docs/RESULTS.md's tables hold it."""
  table = []
  for setting, description in STUDY_SETTINGS.items():
    rows = study_accuracy(results_dir, setting)
    row: dict[str, Any] = {
      "setting": description,
      "seeds x draws": f"{rows[0]['seeds']} x {rows[0]['draws']}",
    }
    row.update({r["label"]: r["summary"] for r in rows})
    table.append(row)
  columns = list(dict.fromkeys(key for row in table for key in row))
  return "\n".join(
    [
      "Final test accuracy, mean +- 95% CI over seeds (`docs/results/*/<setting>_accuracy.csv`, rendered by "
      "`python scripts/readme_table.py --update_study`); paired differences, verdicts, the game tables "
      "and the scaling to N = 5,000 with both lambda rules are in [docs/RESULTS.md](docs/RESULTS.md).",
      "",
      report.markdown_table(table, columns, FLOATFMT),
    ]
  )


def parse_table(text: str) -> list[dict[str, str]]:
  """The markdown table in ``text`` as rows of column -> cell text (the inverse of report.markdown_table)."""
  lines = [line for line in text.splitlines() if line.startswith("|")]
  validate.require(len(lines) >= 2, "the README block is invalid: expected a markdown table")
  split = lambda line: [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
  header = split(lines[0])
  return [dict(zip(header, split(line), strict=True)) for line in lines[2:]]


def formatted(value: Any) -> str:
  """One cell as the run prints it."""
  return parse_table(report.markdown_table([{"cell": value}], ["cell"], FLOATFMT))[0]["cell"]


def differences(
  snapshot_rows: Sequence[Mapping[str, Any]], fresh_rows: Sequence[Mapping[str, Any]]
) -> list[str]:
  """What a fresh default run changes: labels, game columns as printed, accuracies beyond the tolerance."""
  labels = [r["label"] for r in snapshot_rows], [r["label"] for r in fresh_rows]
  if labels[0] != labels[1]:
    return [f"labels {labels[0]} -> {labels[1]}"]
  found = []
  for old, new in zip(snapshot_rows, fresh_rows, strict=True):
    for column in GAME_COLUMNS:
      if formatted(old[column]) != formatted(new[column]):
        found.append(f"{old['label']} {column}: {formatted(old[column])} -> {formatted(new[column])}")
    for column, tolerance in ACCURACY_TOLERANCE.items():
      if not abs(float(old[column]) - float(new[column])) <= tolerance:
        found.append(f"{old['label']} {column}: {old[column]} -> {new[column]} (tolerance {tolerance})")
  return found


def main(argv):
  del argv
  with open(README.value) as f:
    readme = f.read()
  if UPDATE_STUDY.value and not UPDATE.value:
    readme = replace_block(readme, render_study(RESULTS_DIR.value), STUDY_BEGIN, STUDY_END)
    report.write_text_atomic(README.value, readme)
    print(f"wrote the study block in {os.path.relpath(README.value)}")
    return
  if UPDATE.value:
    folder = COMPARISON.value if os.path.isdir(COMPARISON.value) else os.path.dirname(COMPARISON.value)
    snapshot = {
      "command": recorded_command(os.path.join(folder, report.MANIFEST)),
      "commit": COMMIT.value or head_commit(),
      "machine": MACHINE.value or describe_machine(),
      "rows": load_rows(COMPARISON.value),
    }
    report.write_json_atomic(SNAPSHOT.value, snapshot)
    readme = replace_header(replace_block(readme, render(snapshot)), header_line())
    readme = replace_block(readme, render_study(RESULTS_DIR.value), STUDY_BEGIN, STUDY_END)
    report.write_text_atomic(README.value, readme)
    print(f"wrote {os.path.relpath(SNAPSHOT.value)} and the table in {os.path.relpath(README.value)}")
    return
  with open(SNAPSHOT.value) as f:
    snapshot = json.load(f)
  if block(readme) != render(snapshot):
    validate.fail(
      f"the README's table is not {SNAPSHOT.value} rendered: run scripts/readme_table.py --update"
    )
  if block(readme, STUDY_BEGIN, STUDY_END) != render_study(RESULTS_DIR.value):
    validate.fail(
      f"the README's study block is not {RESULTS_DIR.value} rendered: run scripts/readme_table.py --update"
    )
  print(f"the README's table is {SNAPSHOT.value} rendered, its study block {RESULTS_DIR.value}'s")


if __name__ == "__main__":
  sim_flags.run(main)
