"""Runs one script's ``main`` in-process, once per command line read from stdin (tests/cli.py drives it).

Started as ``python tests/cli_worker.py scripts/<name>.py``: imports the script (defining its flags),
prints one JSON line describing them, then for each JSON line ``{"argv": [...]}`` on stdin resets the
flags, runs the script exactly as ``sim_flags.run`` would (flag parsing, then main; misuse exits 2) with
its stdout and stderr captured, and prints ``{"rc", "stdout", "stderr"}``. One process per script keeps
jax's import and the compiled programs across calls.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
import traceback


def _flag_info(flag) -> dict:
  return {
    "name": flag.name,
    "type": flag.flag_type(),
    "enum": list(getattr(flag.parser, "enum_values", None) or []),
    "default": ",".join(map(str, flag.default_unparsed))
    if isinstance(flag.default_unparsed, list)
    else str(flag.default_unparsed),
  }


def main() -> None:
  script = os.path.abspath(sys.argv[1])
  sys.path.insert(0, os.path.dirname(script))
  stem = os.path.splitext(os.path.basename(script))[0]
  spec = importlib.util.spec_from_file_location(stem, script)
  module = importlib.util.module_from_spec(spec)
  sys.modules[stem] = module
  spec.loader.exec_module(module)
  import sim_flags  # after the script: it is on the path now

  by_module = sim_flags.FLAGS.flags_by_module_dict()
  own = [f for name in (stem, "sim_flags") for f in by_module.get(name, [])]
  real_stdout = sys.stdout
  print(json.dumps({"flags": [_flag_info(f) for f in own]}), file=real_stdout, flush=True)
  for line in sys.stdin:
    argv = json.loads(line)["argv"]
    sim_flags.FLAGS.unparse_flags()
    sys.argv = [script, *argv]
    out, err, rc = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        sim_flags.call(module.main, sim_flags.parse_flags(sys.argv))
      except SystemExit as exit_:
        rc = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
      except BaseException:
        traceback.print_exc()
        rc = 1
    print(
      json.dumps({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}), file=real_stdout, flush=True
    )


if __name__ == "__main__":
  main()
