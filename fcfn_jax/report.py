"""Result files and tables: crash-safe JSON/CSV writers, aligned text and markdown tables, a timer.

Rows are dicts of column -> value; values may be Python scalars/strings or numpy/jax scalars and arrays
(converted with ``tolist()``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import numbers
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from fcfn_jax.validate import require, reraise

Row = Mapping[str, Any]


def _to_builtin(value: Any) -> Any:
  """numpy/jax scalars and arrays -> Python scalars and lists; other values unchanged."""
  return value.tolist() if hasattr(value, "tolist") else value


def _json_default(value: Any) -> Any:
  converted = _to_builtin(value)
  require(
    converted is not value,
    f"value {value!r} of type {type(value).__name__} is not "
    "JSON-serializable: expected dicts, lists, strings, numbers, bools, "
    "None or numpy/jax arrays",
  )
  return converted


def _atomic_write(path: str | os.PathLike[str], write: Callable[[IO[str]], None]) -> None:
  """Runs ``write`` on a temporary file next to ``path``, fsyncs it, then renames it over ``path``.

  The rename is atomic, so ``path`` holds either its old or its complete new content; on any error the
  temporary file is removed and ``path`` is untouched.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
      os.fchmod(f.fileno(), 0o644)  # mkstemp's 0o600 would make result files private
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  # The rename itself is durable only once the directory entry is flushed.
  dir_fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
  """Writes ``text`` to ``path`` atomically (e.g. a markdown table)."""
  _atomic_write(path, lambda f: f.write(text))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
  """Writes ``obj`` as indented JSON to ``path`` atomically (numpy/jax values become lists/scalars).

  NaN and infinities are written as ``NaN``/``Infinity``, as Python's json module reads and writes them.

  Raises:
    ConfigError: ``obj`` holds a value JSON cannot represent; ``path`` is left untouched.
  """
  _atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=_json_default))


def _columns(rows: Sequence[Row], columns: Sequence[str] | None) -> list[str]:
  """``columns``, or the union of the rows' keys in first-seen order."""
  for i, row in enumerate(rows):
    require(isinstance(row, Mapping), f"rows[{i}]={row!r} is invalid: expected a dict")
  if columns is not None:
    return list(columns)
  return list(dict.fromkeys(key for row in rows for key in row))


def write_csv_atomic(
  path: str | os.PathLike[str], rows: Sequence[Row], columns: Sequence[str] | None = None
) -> None:
  """Writes ``rows`` as CSV with a header to ``path`` atomically; missing values are empty cells.

  Args:
    path: the file to (over)write.
    rows: one dict per line.
    columns: header order; default the union of the rows' keys in first-seen order.

  Raises:
    ConfigError: a row is not a dict or has a key outside ``columns``; ``path`` is left untouched.
  """
  header = _columns(rows, columns)

  def write(f: IO[str]) -> None:
    writer = csv.DictWriter(f, fieldnames=header)
    writer.writeheader()
    for i, row in enumerate(rows):
      extra = sorted(set(row) - set(header))
      require(not extra, f"rows[{i}] has keys {extra} outside columns={header}")
      writer.writerow({key: _to_builtin(value) for key, value in row.items()})

  _atomic_write(path, write)


def _format(value: Any, floatfmt: str) -> str:
  """One cell: empty for None, ``floatfmt`` for non-integral numbers, ``str`` otherwise."""
  if value is None:
    return ""
  if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
    return format(value, floatfmt)
  return str(value)


def _cells(
  rows: Sequence[Row], columns: Sequence[str] | None, floatfmt: str
) -> tuple[list[str], list[list[str]], list[bool]]:
  """Header, formatted cells, and which columns hold only numbers (right-aligned)."""
  with reraise(
    (TypeError, ValueError),
    lambda e: f"floatfmt={floatfmt!r} is invalid: expected a float format spec such as '.4g'",
  ):
    format(0.5, floatfmt)
  header = _columns(rows, columns)
  values = [[_to_builtin(row.get(col)) for col in header] for row in rows]
  numeric = [all(isinstance(row[j], numbers.Real | None) for row in values) for j in range(len(header))]
  return header, [[_format(v, floatfmt) for v in row] for row in values], numeric


def format_table(rows: Sequence[Row], columns: Sequence[str] | None = None, floatfmt: str = ".4g") -> str:
  """An aligned plain-text table (header, rule, one line per row); numbers right-aligned.

  Example::

    mechanism    utility  participants
    -----------  -------  ------------
    stackelberg    3.142            12
  """
  header, body, numeric = _cells(rows, columns, floatfmt)
  widths = [max(map(len, column)) for column in zip(header, *body)]

  def line(cells: Sequence[str]) -> str:
    return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

  return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def markdown_table(rows: Sequence[Row], columns: Sequence[str] | None = None, floatfmt: str = ".4g") -> str:
  """A GitHub-flavoured markdown table; numeric columns right-aligned (``---:``)."""
  header, body, numeric = _cells(rows, columns, floatfmt)
  rule = ["---:" if num else "---" for num in numeric]
  return "\n".join(
    "| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |" for cells in [header, rule, *body]
  )


def write_results(
  out: str | os.PathLike[str],
  name: str,
  rows: Sequence[Row],
  columns: Sequence[str] | None = None,
  meta: Mapping[str, Any] | None = None,
) -> None:
  """Writes one result table atomically as ``{name}.csv``, ``{name}.json`` and ``{name}.md`` in ``out``.

  The JSON holds ``rows``, or ``{**meta, "rows": rows}`` when ``meta`` (e.g. the run's setup) is given.
  """
  os.makedirs(out, exist_ok=True)
  write_csv_atomic(os.path.join(out, f"{name}.csv"), rows, columns)
  write_json_atomic(os.path.join(out, f"{name}.json"), rows if meta is None else {**meta, "rows": rows})
  write_text_atomic(os.path.join(out, f"{name}.md"), markdown_table(rows, columns) + "\n")


class Timer(contextlib.AbstractContextManager):
  """Wall-clock seconds of a ``with`` block: ``with Timer() as t: ...``, then ``t.elapsed``.

  JAX dispatches asynchronously: call ``jax.block_until_ready`` on the results inside the block.
  ``elapsed`` reads the running time while the block is still open.
  """

  def __init__(self):
    self._start: float | None = None
    self._stop: float | None = None

  def __enter__(self) -> Timer:
    self._start, self._stop = time.perf_counter(), None
    return self

  def __exit__(self, *exc_info) -> None:
    self._stop = time.perf_counter()

  @property
  def elapsed(self) -> float:
    require(self._start is not None, "Timer.elapsed is unavailable: the timer was never entered")
    return (time.perf_counter() if self._stop is None else self._stop) - self._start
