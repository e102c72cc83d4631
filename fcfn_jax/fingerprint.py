"""Fingerprints: what determines a run, as named parts, so a checkpoint can tell it belongs to another run.

A fingerprint is a flat dict of JSON values: every field of the (nested) config dataclasses under its
dotted path (``game.lam``, ``federated.rounds``; a field added to any config is covered with no code
change), plus whatever else the caller adds (a digest of the data, a state-layout version). Its
:func:`digest` is the SHA-256 of the canonical JSON, and :func:`differences` names the parts that differ
between two fingerprints (README "Resume, fingerprints and corrupt checkpoints").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

Fingerprint = dict[str, Any]


def _jsonable(value: Any) -> Any:
  """A JSON value standing for ``value``: scalars as they are, sequences as lists, arrays by digest."""
  if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) > 0:
    return {"sha256": arrays_digest(value)}
  if hasattr(value, "item") and np.ndim(value) == 0:
    value = value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  return repr(value)


def config_fields(cfg: Any, *, skip: Collection[str] = (), prefix: str = "") -> Fingerprint:
  """Every field of a (nested) dataclass instance by dotted path, as JSON values, except ``skip`` paths."""
  fields = {}
  for field in dataclasses.fields(cfg):
    path = prefix + field.name
    if path in skip:
      continue
    value = getattr(cfg, field.name)
    if dataclasses.is_dataclass(value):
      fields.update(config_fields(value, skip=skip, prefix=path + "."))
    else:
      fields[path] = _jsonable(value)
  return fields


def arrays_digest(*arrays: Any) -> str:
  """SHA-256 over each array's dtype, shape and bytes, in order (hex)."""
  digest = hashlib.sha256()
  for array in arrays:
    array = np.ascontiguousarray(array)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
  return digest.hexdigest()


def canonical(parts: Mapping[str, Any]) -> Fingerprint:
  """``parts`` as they read back from JSON (tuples become lists), so stored and fresh ones compare equal."""
  return json.loads(json.dumps(_jsonable(dict(parts))))


def digest(parts: Mapping[str, Any]) -> str:
  """SHA-256 of the canonical, key-sorted JSON of ``parts`` (hex)."""
  text = json.dumps(canonical(parts), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def differences(stored: Mapping[str, Any], current: Mapping[str, Any], limit: int = 4) -> str:
  """The differing parts, e.g. ``game.lam 50.0 -> 5.0; federated.rounds 2 -> 6`` (at most ``limit``)."""
  stored, current = canonical(stored), canonical(current)
  missing = object()
  changed = [
    f"{key} {_short(stored.get(key, missing))} -> {_short(current.get(key, missing))}"
    for key in sorted(stored.keys() | current.keys())
    if stored.get(key, missing) != current.get(key, missing)
  ]
  more = f" (and {len(changed) - limit} more)" if len(changed) > limit else ""
  return "; ".join(changed[:limit]) + more


def _short(value: Any) -> str:
  if not isinstance(value, (type(None), bool, int, float, str, list, dict)):
    return "(absent)"
  text = json.dumps(value)
  return text if len(text) <= 24 else text[:20] + "..."
