"""PNG plots of experiment results (matplotlib, headless Agg backend); inputs are result rows (dicts)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import matplotlib

from fcfn_jax.config import MECHANISM_LABELS

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

Row = dict[str, Any]


def _label(mechanism: str) -> str:
  """The mechanism's name in plots: no_incentive is labelled a mandate (it violates IR)."""
  return MECHANISM_LABELS.get(mechanism, mechanism)


def _save(fig, path: str | os.PathLike[str]) -> str:
  """Writes the figure to a temporary file and renames it, so a crash leaves no half-written PNG."""
  path = os.fspath(path)
  tmp = f"{path}.tmp.png"
  fig.tight_layout()
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)
  return path


def accuracy_per_round(history: Sequence[Row], path: str | os.PathLike[str]) -> str:
  """Test accuracy vs round, one line per mechanism."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for mech in dict.fromkeys(r["mechanism"] for r in history):
    rows = [r for r in history if r["mechanism"] == mech]
    ax.plot([r["round"] for r in rows], [r["test_accuracy"] for r in rows], marker="o", label=_label(mech))
  ax.set(xlabel="round", ylabel="test accuracy", title="Test accuracy per round")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def bars(summary: Sequence[Row], columns: Sequence[str], path: str | os.PathLike[str], title: str) -> str:
  """One bar panel per column (e.g. utilities, participants, payments), one bar per mechanism."""
  fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.6), squeeze=False)
  names = [_label(r["mechanism"]) for r in summary]
  for ax, col in zip(axes[0], columns):
    ax.bar(range(len(names)), [r[col] for r in summary], color=plt.cm.tab10.colors[: len(names)])
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_title(col, fontsize=9)
    ax.axhline(0, color="black", lw=0.5)
  fig.suptitle(title)
  return _save(fig, path)


def metric_vs_parameter(
  rows: Sequence[Row], parameter: str, metric: str, path: str | os.PathLike[str]
) -> str:
  """metric vs a swept parameter (e.g. accuracy vs number of clients), one line per mechanism."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for mech in dict.fromkeys(r["mechanism"] for r in rows):
    pts = sorted((r[parameter], r[metric]) for r in rows if r["mechanism"] == mech)
    ax.plot([p for p, _ in pts], [m for _, m in pts], marker="o", label=_label(mech))
  ax.set(xlabel=parameter, ylabel=metric, title=f"{metric} vs {parameter}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)
