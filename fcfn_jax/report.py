"""Result files and tables: a run's all-or-nothing output folder, crash-safe JSON/CSV writers, aligned text
and markdown tables, a timer.

Rows are dicts of column -> value; values may be Python scalars/strings or numpy/jax scalars and arrays
(converted with ``tolist()``).

:class:`ResultsFolder` is the one writer of a script's results (README "Outputs"): everything goes into a
hidden staging folder beside ``out``, which replaces ``out`` whole once the run succeeds; a failed run
leaves nothing. ``out`` may be new, empty, or a folder an earlier run wrote (it holds ``manifest.json``);
any other folder is refused before any work, so a mistyped ``--out`` can never wipe unrelated files.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import json
import numbers
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from fcfn_jax.validate import check_path, fail, require, reraise

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


def _atomic_write(path: str | os.PathLike[str], write: Callable[[IO], None], binary: bool = False) -> None:
  """Runs ``write`` on a temporary file next to ``path``, fsyncs it, then renames it over ``path``.

  The rename is atomic, so ``path`` holds either its old or its complete new content; on any error the
  temporary file is removed and ``path`` is untouched.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  text_mode = {} if binary else {"newline": "", "encoding": "utf-8"}
  try:
    with os.fdopen(fd, "wb" if binary else "w", **text_mode) as f:
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


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (e.g. a PNG)."""
  _atomic_write(path, lambda f: f.write(data), binary=True)


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


def csv_value(text: str) -> Any:
  """A cell of a CSV written by :func:`write_csv_atomic`, back as int, float or (else) the string."""
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


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
  note: str | None = None,
) -> None:
  """Writes one result table atomically as ``{name}.csv``, ``{name}.json`` and ``{name}.md`` in ``out``.

  ``columns`` are the markdown table's columns and the CSV's first ones; the CSV and the JSON keep every
  key of the rows. The JSON holds ``rows``, or ``{**meta, "rows": rows}`` when ``meta`` (e.g. the run's
  setup) is given; ``note`` (e.g. what a column means) follows the markdown table.
  """
  os.makedirs(out, exist_ok=True)
  every = None if columns is None else list(dict.fromkeys([*columns, *_columns(rows, None)]))
  write_csv_atomic(os.path.join(out, f"{name}.csv"), rows, every)
  write_json_atomic(os.path.join(out, f"{name}.json"), rows if meta is None else {**meta, "rows": rows})
  write_text_atomic(
    os.path.join(out, f"{name}.md"), markdown_table(rows, columns) + "\n" + (f"\n{note}\n" if note else "")
  )


MANIFEST = "manifest.json"
_STAGING = "partial"  # .<name>.partial-<pid>-*: a run's folder being written
_REPLACED = "replaced"  # .<name>.replaced-<pid>-*: the folder it replaces, removed after the swap


def check_output_folder(out: str | os.PathLike[str]) -> str:
  """The absolute path of ``out`` once it is known that a run may write it whole; writes nothing.

  ``out`` must be new, an empty folder or a folder an earlier run wrote (it holds ``manifest.json``), and
  its nearest existing ancestor a folder in which folders can be created (tried with an empty probe
  folder, removed at once: permission bits do not tell for root or for read-only file systems).

  Raises:
    ConfigError naming ``out``: empty, a file, a non-empty folder no run wrote, or not writable.
  """
  check_path("out", out)
  out = os.fspath(out)
  path = os.path.abspath(out)
  if os.path.lexists(path):
    require(
      os.path.isdir(path), f"out={out!r} is a file: expected a folder (new, empty, or a previous run's)"
    )
    entries = os.listdir(path)
    require(
      not entries or MANIFEST in entries,
      f"out={out!r} is a non-empty folder that no run wrote (no {MANIFEST}): expected a new or empty "
      "folder, or one an earlier run wrote (it is replaced whole)",
    )
  ancestor = os.path.dirname(path)
  while not os.path.lexists(ancestor):
    ancestor = os.path.dirname(ancestor)
  require(os.path.isdir(ancestor), f"out={out!r} is invalid: {ancestor!r} is a file, expected a folder")
  try:
    os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".write-test-"))
  except OSError as e:
    fail(f"out={out!r} is not writable: cannot create folders in {ancestor!r} ({e.strerror})")
  return path


def file_sha256(path: str | os.PathLike[str]) -> str:
  """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 20):
      digest.update(block)
  return digest.hexdigest()


def rename_aside(path: str, suffix: str) -> str:
  """Renames ``path`` to ``<path><suffix>`` (``-2``, ``-3``, ... if taken), keeping what it held; returns
  the new path."""
  target, n = path + suffix, 1
  while os.path.exists(target):
    n += 1
    target = f"{path}{suffix}-{n}"
  os.rename(path, target)
  return target


def _file_record(path: str) -> dict[str, Any]:
  return {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class ResultsFolder(contextlib.AbstractContextManager):
  """The output folder of one run, written all-or-nothing.

  Usage::

    with ResultsFolder("results/x", manifest={"script": ..., "setup": ...}) as out:
      out.table("comparison", rows, columns)        # comparison.{csv,json,md}
      plotting.bars(..., out.file("utilities.png"), ...)

  Entering checks ``out`` (:func:`check_output_folder`) and creates the hidden staging folder
  ``.<name>.partial-<pid>-*`` beside it (removing stale ones of dead processes). Leaving normally writes
  ``manifest.json`` (the manifest dict plus every file's size and SHA-256, the command line and the time)
  and swaps the staging folder in for ``out``: an earlier run's folder is replaced whole, so no old file
  outlives it. Leaving with an exception removes the staging folder and any parent folders it created.

  ``commit=False`` (the processes other than 0 of a multi-process run, which compute the same results):
  the files are written into a private temporary folder that leaving removes; ``out`` is never touched.
  """

  def __init__(
    self, out: str | os.PathLike[str], manifest: Mapping[str, Any] | None = None, commit: bool = True
  ):
    self.out = os.fspath(out)
    self.path = check_output_folder(out)
    self._manifest = dict(manifest or {})
    self._commit = commit
    self._staging: str | None = None
    self._created: list[str] = []

  def __enter__(self) -> ResultsFolder:
    if not self._commit:
      self._staging = tempfile.mkdtemp(prefix="fcfn-uncommitted-results-")
      return self
    self.path = check_output_folder(self.out)  # again: the folder may have changed since construction
    parent, name = os.path.split(self.path)
    missing = parent
    while not os.path.exists(missing):
      self._created.append(missing)
      missing = os.path.dirname(missing)
    os.makedirs(parent, exist_ok=True)
    for entry in os.listdir(parent):
      for kind in (_STAGING, _REPLACED):
        prefix = f".{name}.{kind}-"
        pid = entry[len(prefix) :].split("-")[0] if entry.startswith(prefix) else ""
        if pid.isdigit() and not _pid_alive(int(pid)):
          shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    self._staging = tempfile.mkdtemp(dir=parent, prefix=f".{name}.{_STAGING}-{os.getpid()}-")
    os.chmod(self._staging, 0o755)  # mkdtemp's 0o700 would make the results private
    return self

  @property
  def folder(self) -> str:
    """The folder being written (the staging folder, renamed to ``out`` when the run ends)."""
    require(self._staging is not None, "ResultsFolder is unavailable outside its with block")
    return self._staging

  def file(self, name: str) -> str:
    """Where to write the result file ``name`` (a plain file name) inside the folder being written."""
    require(self._staging is not None, "ResultsFolder is unavailable outside its with block")
    require(
      isinstance(name, str) and name not in ("", ".", "..", MANIFEST) and os.path.basename(name) == name,
      f"name={name!r} is invalid: expected a plain file name other than {MANIFEST}",
    )
    return os.path.join(self._staging, name)

  def table(
    self,
    name: str,
    rows: Sequence[Row],
    columns: Sequence[str] | None = None,
    meta: Mapping[str, Any] | None = None,
    note: str | None = None,
  ) -> None:
    """``{name}.csv``, ``{name}.json`` (``{**meta, "rows": rows}`` with meta) and ``{name}.md`` (+ note)."""
    write_results(self.folder, name, rows, columns, meta, note)

  def csv(self, name: str, rows: Sequence[Row], columns: Sequence[str] | None = None) -> None:
    """``{name}.csv`` alone (long tables: per-round history, per-client records)."""
    write_csv_atomic(self.file(f"{name}.csv"), rows, columns)

  def json(self, name: str, obj: Any) -> None:
    """``{name}.json``."""
    write_json_atomic(self.file(f"{name}.json"), obj)

  def comparison(
    self, comparison: Any, columns: Sequence[str] | None = None, meta: Any = None, note: str | None = None
  ) -> None:
    """A ``simulation.Comparison`` (summary, history, clients): ``comparison.{csv,json,md}``,
    ``history.csv`` and ``clients.csv``."""
    self.table("comparison", comparison.summary, columns, meta, note)
    self.csv("history", comparison.history)
    self.csv("clients", comparison.clients)

  def files(self) -> list[str]:
    """The result files written so far."""
    return sorted(os.listdir(self.folder))

  def __exit__(self, exc_type, exc, tb) -> None:
    staging, self._staging = self._staging, None
    if not self._commit:
      shutil.rmtree(staging, ignore_errors=True)
      return
    if exc_type is not None:
      shutil.rmtree(staging, ignore_errors=True)
      for folder in self._created:  # innermost first; only the empty ones this run made
        with contextlib.suppress(OSError):
          os.rmdir(folder)
      return
    files = {name: _file_record(os.path.join(staging, name)) for name in sorted(os.listdir(staging))}
    manifest = {
      **self._manifest,
      "argv": sys.argv,
      "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "files": files,
    }
    write_json_atomic(os.path.join(staging, MANIFEST), manifest)
    parent, name = os.path.split(self.path)
    replaced = None
    if os.path.lexists(self.path):
      replaced = tempfile.mkdtemp(dir=parent, prefix=f".{name}.{_REPLACED}-{os.getpid()}-")
      os.rename(self.path, os.path.join(replaced, name))
    os.rename(staging, self.path)
    if replaced is not None:
      shutil.rmtree(replaced)
    dir_fd = os.open(parent, os.O_RDONLY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)


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
