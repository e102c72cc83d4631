"""Drives scripts through tests/cli_worker.py: one long-lived process per script, many command lines."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "cli_worker.py")
SCRIPTS = (
  "compare_mechanisms.py",
  "sweep_experiments.py",
  "sweep_games.py",
  "tune_pricing.py",
  "misreporting.py",
  "privacy_audit.py",
  "gradient_inversion.py",
  "make_embedded_dataset.py",
)
# Small runs: a few clients, one round.
TINY = [
  "--num_clients=4",
  "--capacity=16",
  "--test_examples=50",
  "--rounds=1",
  "--local_steps=1",
  "--progress=false",
]


@functools.cache
def import_script(script: str):
  """``scripts/<script>`` as a module, imported once per process (a script defines absl flags at import)."""
  stem = script.removesuffix(".py")
  spec = importlib.util.spec_from_file_location(f"scripts_{stem}", os.path.join(REPO, "scripts", script))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class Result(NamedTuple):
  rc: int
  stdout: str
  stderr: str


def env(**extra: str) -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **extra)


class ScriptWorker:
  """One script's worker process; ``worker(*flags)`` runs the script once with those flags.

  Starting does not wait for the process (start several, then use them): the first use of ``flags`` or
  of a call waits for the script's import.
  """

  def __init__(self, script: str, **extra_env: str):
    self.script = script
    # The worker's fd-level stderr (XLA), drained to a file; closed by close().
    self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115
    self._proc = subprocess.Popen(
      [sys.executable, WORKER, os.path.join(REPO, "scripts", script)],
      cwd=REPO,
      env=env(**extra_env),
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=self._log,
      text=True,
    )
    self._flags: dict[str, dict] | None = None

  @property
  def flags(self) -> dict[str, dict]:
    """The script's flags: name -> {name, type, enum, default}."""
    if self._flags is None:
      self._flags = {f["name"]: f for f in self._read(timeout=300)["flags"]}
    return self._flags

  def _read(self, timeout: float) -> dict:
    watchdog = threading.Timer(timeout, self._proc.kill)
    watchdog.start()
    try:
      line = self._proc.stdout.readline()
    finally:
      watchdog.cancel()
    if not line:
      self._log.seek(0)
      raise RuntimeError(f"{self.script} worker died: {self._log.read()[-3000:]}")
    return json.loads(line)

  def __call__(self, *flags: str, timeout: float = 600) -> Result:
    assert self.flags  # the import's line comes first
    self._proc.stdin.write(json.dumps({"argv": list(flags)}) + "\n")
    self._proc.stdin.flush()
    return Result(**self._read(timeout))

  def close(self) -> None:
    if not self._proc.stdin.closed:
      self._proc.stdin.close()  # the worker's loop ends; close() several workers' stdin first to overlap
    try:
      self._proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self._proc.kill()
    self._log.close()
