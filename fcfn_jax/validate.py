"""Input validation: the one place that raises :class:`ConfigError`.

Every check names the offending value and what is allowed, in one line, so that a CLI can print it and
exit with status 2. Array checks are tracer-aware: under ``jit``/``vmap`` the values are unknown, so they
are skipped there and run on concrete (host) inputs only.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Collection, Iterator
from typing import Any, NoReturn

import jax
import numpy as np


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the field, the value and what is allowed."""


def fail(message: str) -> NoReturn:
  """Raises ConfigError(message)."""
  raise ConfigError(message)


def require(condition: Any, message: str) -> None:
  """Raises ConfigError(message) unless ``condition``."""
  if not condition:
    fail(message)


@contextlib.contextmanager
def reraise(
  errors: type[BaseException] | tuple[type[BaseException], ...], describe: Callable[[BaseException], str]
) -> Iterator[None]:
  """Turns the listed exceptions raised inside the block into ConfigError(describe(error)), chained; the
  message is one line (a library's multi-line message has its whitespace collapsed)."""
  try:
    yield
  except errors as error:
    raise ConfigError(" ".join(describe(error).split())) from error


def is_traced(value: Any) -> bool:
  """True for a jax tracer (a value inside jit/vmap/grad), whose entries cannot be checked."""
  return isinstance(value, jax.core.Tracer)


# ----------------------------------------------------------------------------------------------------------
# Scalars (config fields, flags).
# ----------------------------------------------------------------------------------------------------------


def check_finite(name: str, value: Any) -> None:
  # abs(v) <= max is False for NaN and inf, and compares huge ints exactly (math.isfinite overflows on them).
  require(
    isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max,
    f"{name}={value!r} is invalid: expected a finite number",
  )


def check_positive(name: str, value: Any) -> None:
  check_finite(name, value)
  require(value > 0, f"{name}={value!r} is invalid: expected a number > 0")


def check_nonnegative(name: str, value: Any) -> None:
  check_finite(name, value)
  require(value >= 0, f"{name}={value!r} is invalid: expected a number >= 0")


def check_int(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> None:
  require(
    isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
    f"{name}={value!r} is invalid: expected an integer >= {minimum}",
  )
  require(
    maximum is None or value <= maximum,
    f"{name}={value!r} is invalid: expected an integer in [{minimum}, {maximum}]",
  )


def check_seed(name: str, value: Any) -> None:
  """Seeds are 32-bit: jax.random.PRNGKey aliases larger ones (2**32 gives the key of 0) or overflows."""
  check_int(name, value, minimum=0, maximum=2**32 - 1)


def check_path(name: str, value: Any) -> None:
  """None or a non-empty path (str or os.PathLike)."""
  require(
    value is None or (isinstance(value, (str, os.PathLike)) and os.fspath(value) != ""),
    f"{name}={value!r} is invalid: expected a path (a non-empty string) or None",
  )


def check_open_unit(name: str, value: Any) -> None:
  check_finite(name, value)
  require(0 < value < 1, f"{name}={value!r} is invalid: expected a number in (0, 1)")


def check_bool(name: str, value: Any) -> None:
  require(isinstance(value, bool), f"{name}={value!r} is invalid: expected True or False")


def check_choice(name: str, value: Any, allowed: Collection[str]) -> None:
  # The str test first: `in` on an array value would compare elementwise and raise.
  require(
    isinstance(value, str) and value in allowed,
    f"{name}={value!r} is invalid: expected one of {sorted(allowed)}",
  )


# ----------------------------------------------------------------------------------------------------------
# Arrays.
# ----------------------------------------------------------------------------------------------------------


def check_array(
  name: str, value: Any, ok: Callable[[np.ndarray], np.ndarray], allowed: str, *, kinds: str = "iuf"
) -> None:
  """Host-side elementwise check of ``value`` (skipped under tracing and for None).

  ConfigError unless the dtype kind is in ``kinds`` and ``ok(entries)`` holds everywhere (NaN always
  fails); the message names the first bad entry, e.g. ``costs[3]=nan is invalid: expected finite values
  > 0``.
  """
  if value is None or is_traced(value):
    return
  arr = np.asarray(value)
  require(
    arr.dtype.kind in kinds,
    f"{name} has dtype {arr.dtype}: expected {'integers' if kinds == 'iu' else 'real numbers'} ({allowed})",
  )
  as_float = arr.astype(np.float64)
  with np.errstate(invalid="ignore"):
    bad = np.isnan(as_float) | ~np.asarray(ok(arr if kinds == "iu" else as_float), bool)
  if bad.any():
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    where = f"[{', '.join(map(str, idx))}]" if idx else ""
    entry = arr[idx].item() if kinds == "iu" else float(arr[idx])
    fail(f"{name}{where}={entry!r} is invalid: expected {allowed}")


def check_positive_array(name: str, value: Any, *, allow_zero: bool = False) -> None:
  """check_array: every entry finite and > 0 (>= 0 with ``allow_zero``)."""
  if allow_zero:
    check_array(name, value, lambda a: np.isfinite(a) & (a >= 0), "finite values >= 0")
  else:
    check_array(name, value, lambda a: np.isfinite(a) & (a > 0), "finite values > 0")


def check_clients(costs: Any, weights: Any = None) -> None:
  """A game's per-client arrays (host side, skipped under tracing): >= 2 clients on the last axis,
  finite positive costs and weights."""
  for name, arr in (("costs", costs), ("weights", weights)):
    if arr is None or is_traced(arr):
      continue
    shape = np.shape(arr)
    require(
      len(shape) >= 1 and shape[-1] >= 2,
      f"{name} has shape {shape}: a game needs at least 2 clients (last axis >= 2)",
    )
    check_positive_array(name, arr)
