"""fcfn_jax/compile_cache.py: where the scripts' persistent compilation cache lives, and that a second
identical process loads its programs from it instead of compiling them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from fcfn_jax import compile_cache

from .cli import REPO, env

_SETTINGS = (
  "jax_enable_compilation_cache",
  "jax_compilation_cache_dir",
  "jax_persistent_cache_min_compile_time_secs",
  "jax_persistent_cache_min_entry_size_bytes",
)

# A tiny program run as a fresh process: the compilation cache's hits and misses (JAX's monitoring events).
_PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from fcfn_jax import compile_cache
counts = {"hits": 0, "misses": 0}
def listen(event, **kwargs):
  for name in counts:
    if event == f"/jax/compilation_cache/cache_{name}":
      counts[name] += 1
jax.monitoring.register_event_listener(listen)
folder = compile_cache.enable()
jax.block_until_ready(jax.jit(lambda x: jnp.sin(x) * 3.0 + jnp.cumsum(x))(jnp.arange(7.0)))
print(json.dumps({"folder": folder, **counts}))
"""


@pytest.fixture
def settings():
  """Restores JAX's cache settings after a test that changes them in this process."""
  saved = {name: getattr(jax.config, name) for name in _SETTINGS}
  yield
  for name, value in saved.items():
    jax.config.update(name, value)


def _run(**extra: str) -> dict:
  base = {k: v for k, v in env().items() if k not in ("JAX_COMPILATION_CACHE_DIR", compile_cache.ENV)}
  proc = subprocess.run(
    [sys.executable, "-c", _PROGRAM], cwd=REPO, env=base | extra, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.splitlines()[-1])


def _files(folder) -> int:
  return sum(len(files) for _, _, files in os.walk(folder))


def test_enable_sets_the_cache_and_the_empty_path_turns_it_off(settings, tmp_path, monkeypatch):
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  assert compile_cache.enable(str(tmp_path / "c")) == str(tmp_path / "c")
  assert jax.config.jax_enable_compilation_cache
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
  assert jax.config.jax_persistent_cache_min_entry_size_bytes == 0
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "moved"))
  assert compile_cache.enable() == str(tmp_path / "moved")
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "moved")
  monkeypatch.setenv(compile_cache.ENV, "")
  assert compile_cache.enable() is None
  assert not jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir is None


def test_the_default_folder_is_the_users_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compile_cache.default_dir() == str(tmp_path / "fcfn_jax" / "jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert compile_cache.default_dir() == os.path.join(os.path.expanduser("~"), ".cache", "fcfn_jax", "jax")


def test_a_second_identical_process_loads_its_programs_from_the_cache(tmp_path):
  folder = tmp_path / "cache"
  first = _run(**{compile_cache.ENV: str(folder)})
  assert first["folder"] == str(folder) and first["misses"] >= 1 and first["hits"] == 0
  stored = _files(folder)
  assert stored >= 1
  second = _run(**{compile_cache.ENV: str(folder)})
  assert second["hits"] == first["misses"] and second["misses"] == 0  # nothing compiled again
  assert _files(folder) == stored
  # XDG_CACHE_HOME: the default folder; FCFN_JAX_CACHE_DIR='': no cache at all.
  default = _run(XDG_CACHE_HOME=str(tmp_path / "xdg"))
  assert default["folder"] == str(tmp_path / "xdg" / "fcfn_jax" / "jax") and default["misses"] >= 1
  assert _files(tmp_path / "xdg" / "fcfn_jax" / "jax") >= 1
  off = _run(**{compile_cache.ENV: "", "XDG_CACHE_HOME": str(tmp_path / "off")})
  assert off == {"folder": None, "hits": 0, "misses": 0} and not (tmp_path / "off").exists()
