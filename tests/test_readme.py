"""The README cannot drift: its default table is generated (scripts/readme_table.py), its commands are CI's,
and its install pins what the suite runs with."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import readme_table  # noqa: E402  (scripts/ is not a package)

SNAPSHOT = os.path.join(REPO, "docs", "default_comparison.json")


def _read(*path: str) -> str:
  with open(os.path.join(REPO, *path)) as f:
    return f.read()


def _snapshot() -> dict:
  with open(SNAPSHOT) as f:
    return json.load(f)


ROWS = [
  {
    "label": "stackelberg",
    "quality": -3.93187,
    "server_utility": -305.9964,
    "mean_client_utility": 0.72421,
    "social_welfare": -277.0961,
    "average_utility": -6.75844,
    "participants": 16,
    "total_payment": 109.40213,
    "mean_epsilon": 7.771234,
    "min_epsilon": 4.33149,
    "test_accuracy": 0.602150537,
    "redundant_accuracy_loss": -0.00452744,
    "wall_time_s": 54.3,
  },
  {
    "label": "no_incentive (mandate)",
    "quality": -19.3187,
    "server_utility": -965.935,
    "mean_client_utility": -1.0269,
    "social_welfare": -1006.99,
    "average_utility": -24.561,
    "participants": 40,
    "total_payment": 0.0,
    "mean_epsilon": 1.0,
    "min_epsilon": 1.0,
    "test_accuracy": 0.441709,
    "redundant_accuracy_loss": 0.13330,
    "wall_time_s": 49.7,
  },
]
EXPECTED_TABLE = """\
| label | participants | mean_epsilon | total_payment | server_utility | social_welfare | average_utility | test_accuracy | redundant_accuracy_loss |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| stackelberg | 16 | 7.771 | 109.4 | -306 | -277.1 | -6.758 | 0.6022 | -0.004527 |
| no_incentive (mandate) | 40 | 1 | 0 | -965.9 | -1007 | -24.56 | 0.4417 | 0.1333 |"""  # noqa: E501


def test_the_readme_table_is_the_snapshot_rendered_and_parses():
  """README block == render(docs/default_comparison.json); every cell is the snapshot's value as printed."""
  snapshot = _snapshot()
  block = readme_table.block(_read("README.md"))
  assert block == readme_table.render(snapshot)
  command = snapshot["command"].split()
  assert command[:3] == ["python", "scripts/compare_mechanisms.py", "--out=results/default"], command
  assert all(arg.startswith(readme_table._HARMLESS_FLAGS) for arg in command[3:]), command
  assert snapshot["commit"] and snapshot["machine"]
  rows = readme_table.parse_table(block)
  assert [r["label"] for r in rows] == [r["label"] for r in snapshot["rows"]]
  assert len(rows) == 6 and all(list(r) == list(readme_table.COLUMNS) for r in rows)
  for shown, row in zip(rows, snapshot["rows"], strict=True):
    for column in readme_table.COLUMNS[1:]:
      assert shown[column] == readme_table.formatted(row[column]), (row["label"], column)
  for row in snapshot["rows"]:
    assert set(readme_table.GAME_COLUMNS) | set(readme_table.ACCURACY_TOLERANCE) <= set(row)


def test_the_readme_study_block_is_the_study_tables_rendered():
  """README study block == render_study(docs/results): each cell is the setting's accuracy table's summary."""
  results = os.path.join(REPO, "docs", "results")
  block = readme_table.block(_read("README.md"), readme_table.STUDY_BEGIN, readme_table.STUDY_END)
  assert block == readme_table.render_study(results)
  rows = readme_table.parse_table(block)
  assert [r["setting"] for r in rows] == list(readme_table.STUDY_SETTINGS.values())
  for shown, setting in zip(rows, readme_table.STUDY_SETTINGS, strict=True):
    table = readme_table.study_accuracy(results, setting)
    assert {r["label"]: r["summary"] for r in table} == {
      k: v for k, v in shown.items() if k in {r["label"] for r in table}
    }
    assert shown["seeds x draws"] == f"{table[0]['seeds']} x {table[0]['draws']}"


def test_the_script_checks_the_readme_and_exits_0():
  result = subprocess.run(
    [sys.executable, os.path.join(REPO, "scripts", "readme_table.py")],
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO),
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert "README's table is" in result.stdout


def test_the_readme_shows_the_header_line_the_main_command_prints():
  """The header line quoted in the README is what `compare_mechanisms.py --out=results/default` prints first
  (its --dry_run prints it in seconds: the data loaded, nothing trained or written)."""
  readme, line = _read("README.md"), readme_table.header_line()
  assert line.startswith("compare_mechanisms.py: ") and line.endswith("-> results/default")
  assert readme_table.replace_header(readme, line) == readme


def test_the_generator_formats_a_comparison_file_as_the_run_prints_it(tmp_path):
  """comparison.json and comparison.csv (as report.write_results writes them) render the same table."""
  from fcfn_jax import report

  report.write_results(str(tmp_path), "comparison", ROWS)
  from_json = readme_table.load_rows(str(tmp_path))
  from_csv = readme_table.load_rows(str(tmp_path / "comparison.csv"))
  snapshot = {"command": "c", "commit": "abc1234", "machine": "m", "rows": from_json}
  text = readme_table.render(snapshot)
  assert text.splitlines()[0].startswith("Produced by `c` at commit `abc1234` on m;")
  assert text.endswith(EXPECTED_TABLE)
  assert readme_table.render({**snapshot, "rows": from_csv}) == text
  assert readme_table.parse_table(text)[0]["test_accuracy"] == "0.6022"


def test_the_short_table_shows_game_and_accuracy_columns_only():
  assert set(readme_table.COLUMNS) <= {"label", *readme_table.GAME_COLUMNS, *readme_table.ACCURACY_TOLERANCE}
  assert set(readme_table.ACCURACY_TOLERANCE) <= set(readme_table.COLUMNS)


def test_update_rewrites_only_the_block_and_takes_only_the_default_command(tmp_path):
  readme = f"intro\n{readme_table.BEGIN}\nold\n{readme_table.END}\nrest\n"
  new = readme_table.replace_block(readme, "new table")
  assert new == f"intro\n{readme_table.BEGIN}\nnew table\n{readme_table.END}\nrest\n"
  assert readme_table.replace_block(new, "new table") == new
  with pytest.raises(readme_table.validate.ConfigError, match="expected one"):
    readme_table.block("no markers")
  assert readme_table.replace_header("a\ncompare_mechanisms.py: old\nb", "compare_mechanisms.py: new") == (
    "a\ncompare_mechanisms.py: new\nb"
  )
  manifest = tmp_path / "manifest.json"
  manifest.write_text(json.dumps({"argv": ["scripts/compare_mechanisms.py", "--out=results/default"]}))
  assert readme_table.recorded_command(str(manifest)) == readme_table.main_command("results/default")
  manifest.write_text(json.dumps({"argv": ["scripts/compare_mechanisms.py", "--out=r", "--seed=1"]}))
  with pytest.raises(readme_table.validate.ConfigError, match=r"\['--seed=1'\] change the default run"):
    readme_table.recorded_command(str(manifest))
  manifest.write_text(json.dumps({"argv": ["scripts/study.py", "--out=r"]}))
  with pytest.raises(readme_table.validate.ConfigError, match="expected scripts/compare_mechanisms.py"):
    readme_table.recorded_command(str(manifest))


def test_a_fresh_run_differs_only_where_it_should():
  """Game columns are compared as printed (4 significant digits), accuracies within the tolerance."""
  fresh = [dict(row) for row in ROWS]
  assert readme_table.differences(ROWS, fresh) == []
  fresh[0]["server_utility"] = -305.9999  # prints -306 too
  fresh[0]["test_accuracy"] += 0.004
  assert readme_table.differences(ROWS, fresh) == []
  fresh[0]["participants"] = 17
  fresh[1]["test_accuracy"] += 0.006
  found = readme_table.differences(ROWS, fresh)
  assert len(found) == 2
  assert found[0] == "stackelberg participants: 16 -> 17" and "(tolerance 0.005)" in found[1]
  assert readme_table.differences(ROWS, ROWS[::-1])[0].startswith("labels")


def test_the_readme_commands_are_ci_and_install_the_pins():
  """The README's test command is .ci/run's; both installs use constraints.txt, which pins every dependency
  at the lower bound pyproject.toml states (the tested version)."""
  readme, ci = _read("README.md"), _read(".ci", "run")
  commands = re.findall(r"^python3 -m venv \.venv && .*$", readme, flags=re.M)
  assert len(commands) == 2
  assert commands[1] in ci.splitlines()
  assert all(" install -q -c constraints.txt -e " in c for c in commands)
  pins = {}
  for line in _read("constraints.txt").splitlines():
    if line and not line.startswith("#"):
      name, version = line.split("==")
      pins[re.sub(r"[-_.]+", "-", name).lower()] = version
  pyproject = _read("pyproject.toml")
  dependencies = re.findall(r'^  "([^"]+)",$', pyproject, flags=re.M)
  dependencies += re.findall(r'"([^"]+)"', re.search(r"^dev = \[(.*)\]$", pyproject, flags=re.M)[1])
  assert len(dependencies) >= 15
  for dependency in map(Requirement, dependencies):
    pinned = pins[re.sub(r"[-_.]+", "-", dependency.name).lower()]
    assert dependency.specifier.contains(pinned), (dependency, pinned)
    assert str(dependency.specifier) == f">={pinned}", (dependency, pinned)  # the lower bound is tested
  assert not any(name.startswith("fcfn") for name in pins)


@pytest.mark.slow
def test_the_default_command_reproduces_the_readme_table(tmp_path):
  """Reruns the README's main command (minutes): the game columns as printed, the accuracies within
  readme_table.ACCURACY_TOLERANCE. If the code changed the figures on purpose, rerun the command and
  `python scripts/readme_table.py --update`."""
  out = tmp_path / "default"
  command = readme_table.main_command(str(out)).split()
  subprocess.run(
    [sys.executable, *command[1:], "--progress=false"],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO),
    check=True,
    capture_output=True,
    timeout=3600,
  )
  fresh = readme_table.load_rows(str(out))
  assert readme_table.differences(_snapshot()["rows"], fresh) == []


def test_the_docs_quote_the_default_batch_capacity():
  """docs/privacy.md's B -> B_max figures are events.default_capacity's."""
  from fcfn_jax.privacy import events

  quoted = re.search(r"\(B = 8 -> (\d+), 32 -> (\d+), 128 -> (\d+)\)", _read("docs", "privacy.md"))
  assert quoted, "docs/privacy.md no longer quotes the default B_max"
  assert [int(b) for b in quoted.groups()] == [events.default_capacity(b) for b in (8, 32, 128)]
