"""The experiment scripts' plumbing: flags generated from the config dataclasses, one list parser, one way
to start a run (quiet logs, misuse = exit status 2 with one line) and one results writer.

Flags (after fedjax's ``training/structured_flags.py``, but generated): ``ConfigFlags(cls)`` defines one
absl flag per scalar field of ``cls`` and of the dataclasses nested in it, named after the field
(``RENAMED`` keeps three older names), typed by its annotation (bool, int, float, str, ``X | None``,
``tuple[X, ...]`` as a list), defaulting to the dataclass default, with the field's entry in the class
docstring's ``Attributes:`` as help; a str field whose module defines the tuple of allowed values named
after it in capitals and plural (``dataset`` -> ``DATASETS``) becomes an enum flag. A field added to a
config gets its flag with no code here. ``ConfigFlags(...).value()`` builds the config from the flags;
its ConfigError names the flag.

Lists: :func:`define_list` is the one list parser: a comma-separated flag whose every element is parsed
and checked while the flags are parsed (``epsilons[2]='x' is invalid: expected a number``); empty is an
error.

Running: :func:`run` wraps ``app.run``: unparsable flags and every ConfigError end the program with
``error: <one line>`` on stderr and exit status 2 (no traceback), and INFO logs (absl, jax's backend
probing, orbax) stay hidden unless ``--verbosity`` asks for them. :func:`results` prints the one header
line of what runs and opens the run's :class:`fcfn_jax.report.ResultsFolder` (or, with ``--dry_run``,
stops there having written nothing).

Several processes (``scripts/launch.py``, or a cluster with ``FCFN_DISTRIBUTED=auto``; README
"Multi-host"): :func:`run` first joins JAX's distributed runtime (``distributed.initialize``; nothing
without the environment variables) and runs ``main`` under ``distributed.fail_fast`` so that a failing
process ends at once instead of hanging its peers. Every process runs the same ``main``; only process 0
prints to stdout and writes the results folder (the others' stdout is discarded and their folder is a
temporary one, removed at the end; their stderr keeps warnings and errors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any

from absl import app, flags
from absl import logging as absl_logging

from fcfn_jax import compile_cache, distributed, report, validate
from fcfn_jax import config as fc

FLAGS = flags.FLAGS
# The flags this module defines for a script are that script's key flags: its --help lists them.
flags.disclaim_key_flags()
# Field -> flag names that differ from the field's name (kept from the hand-written flags).
RENAMED = {
  "DataConfig.path": "data_path",
  "DataConfig.min_examples_per_client": "min_examples",
  "ModelConfig.name": "model",
}
_GENERATED: dict[str, tuple[Any, Any]] = {}  # flag -> (annotation, default), so shared fields share a flag


# ----------------------------------------------------------------------------------------------------------
# Lists: one parser, every element checked.
# ----------------------------------------------------------------------------------------------------------

Element = Callable[[str, str], Any]  # (name[i], text) -> value, or ConfigError naming name[i]


def number(check: Callable[[str, Any], None] = validate.check_finite) -> Element:
  """Elements that are numbers passing ``check(name[i], value)`` (a ``validate.check_*``)."""

  def parse(name: str, text: str) -> float:
    with validate.reraise(ValueError, lambda _: f"{name}={text!r} is invalid: expected a number"):
      value = float(text)
    check(name, value)
    return value

  return parse


def integer(minimum: int = 1) -> Element:
  """Elements that are integers >= ``minimum``."""

  def parse(name: str, text: str) -> int:
    with validate.reraise(ValueError, lambda _: f"{name}={text!r} is invalid: expected an integer"):
      value = int(text)
    validate.check_int(name, value, minimum=minimum)
    return value

  return parse


def choice(options: Collection[str]) -> Element:
  """Elements from ``options``."""

  def parse(name: str, text: str) -> str:
    validate.check_choice(name, text, options)
    return text

  return parse


class _ListParser(flags.ArgumentParser):
  """A comma-separated list; each element through ``element``; empty refused."""

  syntactic_help = "a comma-separated list"

  def __init__(self, name: str, element: Element):
    self.name, self.element = name, element

  def parse(self, argument: Any) -> list[Any]:
    if isinstance(argument, (list, tuple)):
      texts = [str(a).strip() for a in argument]
    else:
      texts = [t.strip() for t in str(argument).split(",")] if str(argument).strip() else []
    validate.require(texts, f"{self.name} is empty: expected at least one value")
    return [self.element(f"{self.name}[{i}]", text) for i, text in enumerate(texts)]

  def flag_type(self) -> str:
    return "list"


def define_list(name: str, default: Collection[Any], element: Element, help: str) -> flags.FlagHolder:
  """A list flag checked element by element while the flags are parsed (absl reports the flag)."""
  return flags.DEFINE(
    _ListParser(name, element), name, [str(v) for v in default], help, serializer=flags.CsvListSerializer(",")
  )


# ----------------------------------------------------------------------------------------------------------
# Flags generated from config dataclasses.
# ----------------------------------------------------------------------------------------------------------


def _attribute_help(cls: type) -> dict[str, str]:
  """Field -> help: the entries of the class docstring's ``Attributes:`` section (Google style)."""
  lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
  entries, current = {}, None
  for line in lines[lines.index("Attributes:") + 1 :] if "Attributes:" in lines else []:
    if line and not line.startswith(" "):
      break
    if entry := re.match(r"^  (\w+): (.*)$", line):
      current = entry[1]
      entries[current] = entry[2]
    elif current and line.strip():
      entries[current] += " " + line.strip()
  return entries


def _choices(cls: type, flag: str) -> tuple[str, ...] | None:
  """The module's tuple of allowed values named after ``flag`` (dataset -> DATASETS), if any."""
  plural = flag.upper()[:-1] + "IES" if flag.endswith("y") else flag.upper() + "S"
  options = getattr(sys.modules[cls.__module__], plural, None)
  return options if isinstance(options, tuple) and all(isinstance(o, str) for o in options) else None


def _define(flag: str, annotation: Any, default: Any, help: str, options: tuple[str, ...] | None) -> None:
  """One absl flag for a field of type ``annotation`` (shared with an earlier field of equal type/default)."""
  if flag in _GENERATED:
    if _GENERATED[flag] != (annotation, default):
      raise TypeError(f"--{flag} is generated twice with different types or defaults: {_GENERATED[flag]}")
    return
  _GENERATED[flag] = (annotation, default)
  optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
  base = next(a for a in typing.get_args(annotation) if a is not type(None)) if optional else annotation
  if base is bool:
    flags.DEFINE_bool(flag, default, help)
  elif base is int:
    flags.DEFINE_integer(flag, default, help)
  elif base is float:
    flags.DEFINE_float(flag, default, help)
  elif base is str and options and not optional:
    flags.DEFINE_enum(flag, default, options, help)
  elif base is str:
    flags.DEFINE_string(flag, default, help)
  elif typing.get_origin(base) is tuple and typing.get_args(base)[-1] is Ellipsis:
    item = typing.get_args(base)[0]
    element = {int: integer(minimum=-sys.maxsize), float: number(), str: choice(options) if options else None}
    validate.require(item in element, f"--{flag}: tuples of {item} have no list parser")
    define_list(flag, default, element[item] or (lambda name, text: text), help)
  else:
    raise TypeError(f"--{flag}: no flag type for a field annotated {annotation!r}")


class ConfigFlags:
  """The flags of a config dataclass and the dataclasses nested in it, and the config they describe.

  skip: dotted field paths (``"game.mechanism"``) or whole sub-configs (``"data"``) without flags; they
  keep their defaults unless :meth:`value` sets them.
  """

  def __init__(self, cls: type, *, skip: Collection[str] = ()):
    self.cls = cls
    self._skip = tuple(skip)
    self._flags: dict[str, str] = {}  # dotted path -> flag name
    self._define(cls, "")

  def _skipped(self, path: str) -> bool:
    return any(path == s or path.startswith(s + ".") for s in self._skip)

  def _define(self, cls: type, prefix: str) -> None:
    hints, helps = typing.get_type_hints(cls), _attribute_help(cls)
    for field in dataclasses.fields(cls):
      path = prefix + field.name
      if self._skipped(path):
        continue
      if dataclasses.is_dataclass(hints[field.name]):
        self._define(hints[field.name], path + ".")
        continue
      flag = RENAMED.get(f"{cls.__name__}.{field.name}", field.name)
      default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
      help = helps.get(field.name, f"{cls.__name__}.{field.name} (undocumented).")
      _define(flag, hints[field.name], default, help, _choices(cls, flag))
      self._flags[path] = flag

  @property
  def flag_names(self) -> dict[str, str]:
    """Dotted field path -> flag name of every generated flag."""
    return dict(self._flags)

  def value(self, overrides: Mapping[str, Any] | None = None) -> Any:
    """The config the flags describe, with ``overrides`` (dotted path -> value) taking precedence.

    Raises:
      ConfigError from the config's validation, with renamed fields called by their flag names.
    """
    return self._build(self.cls, "", dict(overrides or {}))

  def _build(self, cls: type, prefix: str, overrides: dict[str, Any]) -> Any:
    hints, kwargs, renamed = typing.get_type_hints(cls), {}, {}
    for field in dataclasses.fields(cls):
      path = prefix + field.name
      if path in overrides:
        kwargs[field.name] = overrides[path]
      elif dataclasses.is_dataclass(hints[field.name]):
        kwargs[field.name] = self._build(hints[field.name], path + ".", overrides)
      elif path in self._flags:
        value = FLAGS[self._flags[path]].value
        # List flags give lists; tuple fields keep configs hashable (they key jit caches).
        kwargs[field.name] = tuple(value) if isinstance(value, list) else value
        renamed[field.name] = self._flags[path]
    renamed = {k: v for k, v in renamed.items() if k != v}
    try:
      return cls(**kwargs)
    except validate.ConfigError as err:
      message = str(err)
      for field_name, flag in renamed.items():
        message = re.sub(rf"(?<![\w.]){field_name}=", f"{flag}=", message)
      validate.fail(message)


# ----------------------------------------------------------------------------------------------------------
# Running a script.
# ----------------------------------------------------------------------------------------------------------

RUN_FLAGS = ("out", "progress", "dry_run")  # the RunConfig fields every script has
CHECKPOINT_FLAGS = ("checkpoint", "restart_on_mismatch")


def _exit_with(message: str) -> typing.NoReturn:
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """FLAGS(argv), or exit(2) with absl's one-line message naming the flag and value (no usage text).

  ``--help`` (absl: the script's docstring and its own flags, i.e. those defined through this module or in
  the script) and ``--helpfull`` exit with status 0 instead of absl's 1: asking for help is no error.

  Also quiets the logs: INFO lines (absl's default, which shows jax probing for a TPU on every CPU run,
  and orbax's progress) are hidden unless --verbosity is given; warnings read ``WARNING: ...``.
  """
  try:
    remaining = FLAGS(argv)
  except flags.Error as err:
    _exit_with(str(err))
  except SystemExit as exit_:  # only absl's help flags exit while the flags are parsed
    sys.exit(0 if exit_.code == 1 else exit_.code)
  if not FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  absl_logging.get_absl_handler().setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
  return remaining


def call(main: Callable[[list[str]], None], argv: list[str]) -> None:
  """``main(argv)`` after the flags are parsed; a ConfigError exits with status 2 and one line."""
  try:
    main(argv)
  except validate.ConfigError as err:
    _exit_with(str(err))


def _coordinated(main: Callable[[list[str]], None], argv: list[str]) -> None:
  """:func:`call` under ``distributed.fail_fast``; stdout discarded outside process 0."""
  with distributed.fail_fast(), contextlib.ExitStack() as stack:
    if not distributed.is_coordinator():
      stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))  # noqa: SIM115
    call(main, argv)


def run(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)``: misuse (bad flags, any ConfigError) exits with status 2 and one line on stderr.

  Joins the distributed runtime first when the environment describes one (``distributed.initialize``):
  the same script then runs as one process of a multi-process program (module docstring).
  """
  compile_cache.enable()  # FCFN_JAX_CACHE_DIR moves it, '' turns it off (fcfn_jax/compile_cache.py)
  distributed.initialize()
  app.run(functools.partial(_coordinated, main), flags_parser=parse_flags)


def run_config(run_flags: ConfigFlags) -> fc.RunConfig:
  """The RunConfig the flags describe, its output folder checked (writes nothing)."""
  run_cfg = run_flags.value()
  report.check_output_folder(run_cfg.out)
  return run_cfg


def checkpoint_dir(run_cfg: fc.RunConfig) -> str | None:
  """Where --checkpoint keeps a run's checkpoints: ``<out>.checkpoints``, beside the results folder (which
  each run replaces whole), or None."""
  return os.path.abspath(run_cfg.out).rstrip(os.sep) + ".checkpoints" if run_cfg.checkpoint else None


def fields(cfg: Any, skip: Collection[str] = ()) -> str:
  """``name=value`` of every field of a config dataclass, e.g. for the header line."""
  return " ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg) if f.name not in skip)


def describe(cfg: fc.SimulationConfig, fed_data: Any) -> str:
  """What a simulation actually runs: the real client count, the data, model, schedule and privacy."""
  n = fed_data.pool.num_examples
  return (
    f"{len(n)} clients ({int(n.sum())} examples; {cfg.data.dataset}/{cfg.data.source}, "
    f"{cfg.data.partition}), {len(fed_data.test.y)} test examples, model {cfg.model.name}, "
    f"{cfg.federated.rounds} rounds x {cfg.federated.local_steps} local steps x batch "
    f"{cfg.federated.batch_size}, privacy: {fields(cfg.privacy)}, seed {cfg.seed}"
  )


def results(run_cfg: fc.RunConfig, header: str, setup: Mapping[str, Any]) -> report.ResultsFolder:
  """Prints the header line, then: with --dry_run exits 0 (nothing written); else the run's output folder
  (a ``with`` block: written whole at its end, nothing left on failure)."""
  script = os.path.basename(sys.argv[0])
  print(f"{script}: {header} -> {run_cfg.out}", flush=True)
  if run_cfg.dry_run:
    print("dry run: the flags, the data and the output folder are valid; nothing was written", flush=True)
    sys.exit(0)
  return report.ResultsFolder(
    run_cfg.out, manifest={"script": script, "setup": setup}, commit=distributed.is_coordinator()
  )
