"""JAX's persistent compilation cache for the scripts: a second identical run loads its programs instead of
compiling them again.

Where (first that applies): ``enable(path)``'s path; the environment variable ``FCFN_JAX_CACHE_DIR`` (set
to '' it turns the cache off); a folder already given to JAX (``JAX_COMPILATION_CACHE_DIR``, e.g. the test
suite's); else ``$XDG_CACHE_HOME/fcfn_jax/jax`` (``~/.cache/fcfn_jax/jax``). Every program is cached,
however fast it compiled or small it is. A cached executable is the same program: results do not change.
Call it before the first compilation (JAX opens the cache once per process).
"""

from __future__ import annotations

import os

import jax

ENV = "FCFN_JAX_CACHE_DIR"


def default_dir() -> str:
  """``$XDG_CACHE_HOME/fcfn_jax/jax``, or ``~/.cache/fcfn_jax/jax`` without XDG_CACHE_HOME."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "fcfn_jax", "jax")


def enable(path: str | None = None) -> str | None:
  """Turns on the persistent compilation cache in ``path`` (module docstring for the default): the folder
  used, or None when ``FCFN_JAX_CACHE_DIR`` is '' (the cache is then off)."""
  if path is None:
    path = os.environ.get(ENV)
  if path is None:
    path = jax.config.jax_compilation_cache_dir or default_dir()
  if not path:
    jax.config.update("jax_enable_compilation_cache", False)
    jax.config.update("jax_compilation_cache_dir", None)
    return None
  path = os.path.abspath(os.path.expanduser(path))
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
