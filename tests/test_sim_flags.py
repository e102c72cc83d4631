"""Flags generated from config dataclasses (scripts/sim_flags.py): a field is written once, in its config."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from absl import flags

from fcfn_jax import config as fc
from fcfn_jax import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import sim_flags  # noqa: E402  (scripts/ is not a package)

SAMPLERS = ("poisson", "shuffle")  # the allowed tuple named after the field: makes --zz_sampler an enum


@dataclasses.dataclass(frozen=True)
class ZzInner:
  """A config another engineer might add tomorrow.

  Attributes:
    sampler: how examples are drawn,
      over two lines.
    rate: a rate in (0, 1).
  """

  sampler: str = "poisson"
  rate: float = 0.5

  def __post_init__(self):
    validate.check_choice("sampler", self.sampler, SAMPLERS)
    validate.check_open_unit("rate", self.rate)


@dataclasses.dataclass(frozen=True)
class ZzOuter:
  """Nesting, optional strings, tuples and a field without help.

  Attributes:
    inner: the nested config.
    zz_steps: steps.
    zz_tag: an optional tag.
    zz_weights: weights, as a list.
  """

  inner: ZzInner = dataclasses.field(default_factory=ZzInner)
  zz_steps: int = 3
  zz_tag: str | None = None
  zz_weights: tuple[float, ...] = (1.0, 2.0)
  zz_undocumented: bool = False


def test_fields_become_typed_flags_with_their_docstring_help_and_build_the_config():
  flag_values = flags.FlagValues()
  saved, sim_flags.FLAGS = sim_flags.FLAGS, flag_values
  try:
    with pytest.MonkeyPatch.context() as patch:
      for define in (
        "DEFINE_bool",
        "DEFINE_integer",
        "DEFINE_float",
        "DEFINE_enum",
        "DEFINE_string",
        "DEFINE",
      ):
        original = getattr(flags, define)
        patch.setattr(flags, define, lambda *a, _o=original, **k: _o(*a, flag_values=flag_values, **k))
      patch.setattr(sim_flags, "_GENERATED", {})
      config_flags = sim_flags.ConfigFlags(ZzOuter)
      assert config_flags.flag_names == {
        "inner.sampler": "sampler",
        "inner.rate": "rate",
        "zz_steps": "zz_steps",
        "zz_tag": "zz_tag",
        "zz_weights": "zz_weights",
        "zz_undocumented": "zz_undocumented",
      }
      assert flag_values["sampler"].parser.enum_values == list(SAMPLERS)
      assert flag_values["sampler"].help == "<poisson|shuffle>: how examples are drawn, over two lines."
      assert flag_values["zz_undocumented"].help == "ZzOuter.zz_undocumented (undocumented)."
      assert flag_values["zz_tag"].default is None and flag_values["zz_weights"].flag_type() == "list"
      flag_values(["prog", "--sampler=shuffle", "--zz_steps=7", "--zz_weights=0.5,4", "--zz_tag=a"])
      built = config_flags.value({"inner.rate": 0.25})
      assert built == ZzOuter(ZzInner("shuffle", 0.25), 7, "a", (0.5, 4.0), False)
      flag_values(["prog", "--rate=2"])
      with pytest.raises(validate.ConfigError, match=r"rate=2.0 is invalid: expected a number in \(0, 1\)"):
        config_flags.value()
      with pytest.raises(
        flags.IllegalFlagValueError, match=r"zz_weights\[1\]='x' is invalid: expected a number"
      ):
        flag_values(["prog", "--zz_weights=1,x"])
  finally:
    sim_flags.FLAGS = saved


@pytest.mark.parametrize(
  "cls",
  [
    fc.DataConfig,
    fc.ModelConfig,
    fc.PrivacyConfig,
    fc.FederatedConfig,
    fc.GameConfig,
    fc.SimulationConfig,
    fc.RunConfig,
  ],
)
def test_every_config_field_has_help_in_its_docstring(cls):
  """A field without an Attributes entry would get the help '(undocumented)': document it in its config."""
  scalar = {f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(f.default_factory)}
  scalar -= {f.name for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING}
  assert scalar <= set(sim_flags._attribute_help(cls)), scalar - set(sim_flags._attribute_help(cls))


def test_enum_flags_come_from_the_config_modules_tuples():
  assert sim_flags._choices(fc.DataConfig, "dataset") == fc.DATASETS
  assert sim_flags._choices(fc.GameConfig, "valuation") == fc.VALUATIONS
  assert sim_flags._choices(fc.ModelConfig, "model") == fc.MODELS
  assert sim_flags._choices(fc.GameConfig, "lam") is None


def test_the_list_parser_checks_every_element_and_refuses_empty():
  parser = sim_flags._ListParser("epsilons", sim_flags.number(validate.check_positive))
  assert parser.parse("1, 2.5") == [1.0, 2.5]
  for text, message in [
    ("", r"epsilons is empty: expected at least one value"),
    ("1,0", r"epsilons\[1\]=0.0 is invalid: expected a number > 0"),
    ("1,nan", r"epsilons\[1\]=nan is invalid: expected a finite number"),
    ("x", r"epsilons\[0\]='x' is invalid: expected a number"),
  ]:
    with pytest.raises(validate.ConfigError, match=message):
      parser.parse(text)
  choices = sim_flags._ListParser("mechanisms", sim_flags.choice(fc.MECHANISMS))
  with pytest.raises(validate.ConfigError, match=r"mechanisms\[0\]='auction' is invalid: expected one of"):
    choices.parse("auction")


@pytest.mark.parametrize(
  "script, own_flags",
  [
    # Generated from the configs (sim_flags), from define_list, and the script's own absl flags.
    ("compare_mechanisms.py", ("--num_clients", "--lam", "--mechanisms", "--out", "--dry_run")),
    ("study.py", ("--preset", "--settings", "--seeds", "--out")),
  ],
)
def test_help_lists_the_scripts_own_flags_and_exits_0(script, own_flags):
  """--help shows the script's key flags (those sim_flags defines for it included), not only --helpfull."""
  result = subprocess.run(
    [sys.executable, os.path.join(REPO, "scripts", script), "--help"],
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO),
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  listed = {line.split(":")[0].strip() for line in result.stdout.splitlines() if line.startswith("  --")}
  for flag in own_flags:
    assert flag in listed or flag.replace("--", "--[no]") in listed, (flag, sorted(listed))
  assert "-v,--verbosity" not in listed  # absl.logging's flags stay in --helpfull
