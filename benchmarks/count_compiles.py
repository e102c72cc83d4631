"""How many XLA programs a script compiles, by function and by the repository line that asked for it.

A count, not a timing: it does not depend on the machine's load. Runs the script in this process (runpy)
with JAX's compile events counted ('/jax/core/compile/backend_compile_duration': one per program XLA
compiles; persistent-cache hits are loaded, not compiled) and ``jax_log_compiles`` naming each program.
The persistent compilation cache is a fresh empty folder unless FCFN_JAX_CACHE_DIR is set ('' = off), so
the count is a cold run's. The script's own output is discarded.

  python benchmarks/count_compiles.py                                    # study.py --preset=quick
  python benchmarks/count_compiles.py -- scripts/study.py --preset=quick --settings=femnist_logreg
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import re
import runpy
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = ["scripts/study.py", "--preset=quick", "--progress=false"]
COMPILE = "/jax/core/compile/backend_compile_duration"
_NAME = re.compile(r"Compiling (\S+) with global shapes")


def _site() -> str:
  """The innermost three frames of this repository (not this file) on the stack: 'file:line <- ...'."""
  frames = [
    f
    for f in traceback.extract_stack()
    if f.filename.startswith(ROOT)
    and "site-packages" not in f.filename  # a virtual environment inside the repository
    and not f.filename.endswith("count_compiles.py")
  ]
  return " <- ".join(f"{os.path.relpath(f.filename, ROOT)}:{f.lineno}" for f in frames[::-1][:3])


def count(argv: list[str]) -> tuple[collections.Counter, collections.Counter, collections.Counter]:
  """Runs ``argv`` (a script path and its flags): (events, programs by name, programs by site)."""
  os.environ.setdefault("FCFN_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="count_compiles-"))
  import jax  # after the cache folder is set

  events, names, sites = collections.Counter(), collections.Counter(), collections.Counter()

  def on_duration(event: str, duration: float, **kwargs) -> None:
    events[event] += 1
    if event == COMPILE:
      sites[_site()] += 1

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(lambda event, **kwargs: events.update([event]))

  class Names(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
      match = _NAME.match(record.getMessage())
      if match:
        names[match.group(1)] += 1

  logger = logging.getLogger("jax._src.interpreters.pxla")
  logger.addHandler(Names(logging.DEBUG))
  logger.propagate = False  # the script's log stays quiet
  jax.config.update("jax_log_compiles", True)
  script = os.path.join(ROOT, argv[0])
  sys.path.insert(0, os.path.dirname(script))
  sys.argv = [script, *argv[1:]]
  with contextlib.redirect_stdout(io.StringIO()), tempfile.TemporaryDirectory() as out:
    if argv[0].endswith("study.py") and not any(a.startswith("--out") for a in argv):
      sys.argv.append(f"--out={out}/study")
    try:
      runpy.run_path(script, run_name="__main__")
    except SystemExit as error:
      if error.code not in (0, None):
        raise
  return events, names, sites


def main() -> None:
  argv = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else DEFAULT
  events, names, sites = count(argv)
  print(f"{' '.join(argv)}: {events[COMPILE]} programs compiled")
  for event in sorted(e for e in events if "compil" in e):
    print(f"  {events[event]:5d} {event}")
  print("by function (jax_log_compiles):")
  for name, n in names.most_common():
    print(f"  {n:5d} {name}")
  print("by call site:")
  for site, n in sites.most_common():
    print(f"  {n:5d} {site}")


if __name__ == "__main__":
  main()
