"""PNG plots of experiment results (matplotlib, headless Agg backend): every figure the scripts draw.

Inputs are result rows (dicts) or arrays; each function writes one PNG to ``path`` atomically and
returns the path.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np

from fcfn_jax.config import MECHANISM_LABELS
from fcfn_jax.report import write_bytes_atomic

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

Row = dict[str, Any]
UTILITIES = ("server_utility", "mean_client_utility", "social_welfare", "average_utility")
PARTICIPATION = ("participants", "total_payment", "mean_epsilon", "test_accuracy")


def _label(mechanism: str) -> str:
  """The mechanism's name in plots: no_incentive is labelled a mandate (it violates IR)."""
  return MECHANISM_LABELS.get(mechanism, mechanism)


def _save(fig, path: str | os.PathLike[str]) -> str:
  """Renders the figure in memory, then writes it atomically: a crash leaves no partial or temporary file."""
  path = os.fspath(path)
  buffer = io.BytesIO()
  try:
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
  finally:
    plt.close(fig)
  write_bytes_atomic(path, buffer.getvalue())
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
    heights = [np.nan if r[col] is None else r[col] for r in summary]  # None: a mechanism with no market
    ax.bar(range(len(names)), heights, color=plt.cm.tab10.colors[: len(names)])
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


def comparison(
  summary: Sequence[Row], history: Sequence[Row], directory: str | os.PathLike[str]
) -> list[str]:
  """The comparison's figures in ``directory``: accuracy_per_round.png, utilities.png, participation.png."""
  return [
    accuracy_per_round(history, os.path.join(directory, "accuracy_per_round.png")),
    bars(summary, UTILITIES, os.path.join(directory, "utilities.png"), "Utilities per mechanism"),
    bars(
      summary,
      PARTICIPATION,
      os.path.join(directory, "participation.png"),
      "Participation, payments, accuracy",
    ),
  ]


def tuning_trajectory(rows: Sequence[Row], num_groups: int, path: str | os.PathLike[str]) -> str:
  """Adam on (log R, log pi): the objective U_s (top) and the payment and group prices (bottom) per step.

  rows: one per step with ``step``, ``objective``, ``payment`` and ``price_<g>`` for g < num_groups.
  """
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
  steps = [r["step"] for r in rows]
  top.plot(steps, [r["objective"] for r in rows])
  top.set(ylabel="server utility U_s", title="Adam on (log R, log pi)")
  bottom.plot(steps, [r["payment"] for r in rows], label="payment R")
  for g in range(num_groups if num_groups > 1 else 0):
    bottom.plot(steps, [r[f"price_{g}"] for r in rows], label=f"price group {g}", lw=0.8)
  bottom.set(xlabel="step", ylabel="value", yscale="log")
  bottom.legend(fontsize=7)
  for ax in (top, bottom):
    ax.grid(alpha=0.3)
  return _save(fig, path)


def reconstructions(
  originals: np.ndarray,
  settings: Mapping[str, tuple[np.ndarray, np.ndarray]],
  path: str | os.PathLike[str],
  title: str = "Gradient inversion of single-example updates (PSNR vs original)",
) -> str:
  """One row of images per setting (originals first), one column per image, PSNR under each.

  originals: [images, H, W, C] in [0, 1]; settings: name -> (reconstructions like originals, PSNR
  [images] in dB).
  """
  rows = {"original": (originals, None), **settings}
  cols = originals.shape[0]
  fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols + 1.2, 1.45 * len(rows)), squeeze=False)
  for r, (name, (images, quality)) in enumerate(rows.items()):
    for c in range(cols):
      ax = axes[r, c]
      ax.imshow(
        np.squeeze(images[c], axis=-1) if images.shape[-1] == 1 else images[c],
        cmap="gray",
        vmin=0.0,
        vmax=1.0,
      )
      ax.set_xticks([])
      ax.set_yticks([])
      if quality is not None:
        ax.set_xlabel(f"{float(quality[c]):.1f} dB", fontsize=7)
    axes[r, 0].set_ylabel(name, fontsize=8)
  fig.suptitle(title, fontsize=9)
  return _save(fig, path)


def accuracy_bands(curves: Sequence[Row], path: str | os.PathLike[str], title: str = "") -> str:
  """Test accuracy vs round with its 95% CI band, one line per mechanism (rows of ``study.curves``:
  mechanism, round, accuracy, accuracy_ci_low, accuracy_ci_high)."""
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for mech in dict.fromkeys(r["mechanism"] for r in curves):
    rows = sorted((r for r in curves if r["mechanism"] == mech), key=lambda r: r["round"])
    t = [r["round"] for r in rows]
    (line,) = ax.plot(t, [r["accuracy"] for r in rows], label=_label(mech), lw=1.5)
    ax.fill_between(
      t,
      [r["accuracy_ci_low"] for r in rows],
      [r["accuracy_ci_high"] for r in rows],
      color=line.get_color(),
      alpha=0.18,
    )
  ax.set(xlabel="round", ylabel="test accuracy", title=f"Test accuracy per round, 95% CI {title}".strip())
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return _save(fig, path)


def interval_bars(
  rows: Sequence[Row], columns: Sequence[str], path: str | os.PathLike[str], title: str = ""
) -> str:
  """One bar panel per column, one bar per mechanism, with its 95% CI as an error bar: a row holds
  ``col`` and either ``col_ci`` (half-width) or ``col_ci_low`` / ``col_ci_high``."""
  fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.8), squeeze=False)
  names = [_label(r["mechanism"]) for r in rows]
  for ax, col in zip(axes[0], columns):
    means = np.array([r[col] for r in rows])
    if f"{col}_ci" in rows[0]:
      err = np.array([[r[f"{col}_ci"] for r in rows]] * 2)
    else:
      err = np.array(
        [means - [r[f"{col}_ci_low"] for r in rows], [r[f"{col}_ci_high"] for r in rows] - means]
      )
    ax.bar(range(len(names)), means, yerr=err, capsize=3, color=plt.cm.tab10.colors[: len(names)])
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_title(col, fontsize=9)
    ax.axhline(0, color="black", lw=0.5)
  fig.suptitle(f"{title}: mean, 95% CI over seeds" if title else "mean, 95% CI over seeds")
  return _save(fig, path)


def gap_vs_clients(rows: Sequence[Row], path: str | os.PathLike[str]) -> str:
  """Redundant accuracy loss (gap to the social optimum) vs the number of clients N with its 95% CI band,
  one line per mechanism (rows of ``study.gap_vs_clients``)."""
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for mech in dict.fromkeys(r["mechanism"] for r in rows):
    pts = sorted((r for r in rows if r["mechanism"] == mech), key=lambda r: r["clients"])
    n = [r["clients"] for r in pts]
    (line,) = ax.plot(n, [r["redundant_accuracy_loss"] for r in pts], marker="o", label=_label(mech))
    ax.fill_between(
      n, [r["ci_low"] for r in pts], [r["ci_high"] for r in pts], color=line.get_color(), alpha=0.18
    )
  ax.axhline(0, color="black", lw=0.5)
  ax.set(
    xscale="log",
    xlabel="clients N",
    ylabel="accuracy(social optimum) - accuracy",
    title="Gap to the social optimum vs N, 95% CI",
  )
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return _save(fig, path)


def objective_along_payment(rows: Sequence[Row], path: str | os.PathLike[str], lambda_acc: float) -> str:
  """The trained objective U(R) along the payment: mean over the held-out draws with a +-1 standard-error
  band, the hypergradient dU/dR as a short tangent segment at each point, and R*_Q / R*_trained marked.

  rows: one per payment with ``payment``, ``objective``, ``objective_stderr``, ``grad`` and the booleans
  ``is_R_Q`` / ``is_R_trained`` (the rows of ``tune_pricing.py --objective=trained``'s objective_along_R);
  a point whose gradient is not finite is drawn without its tangent.
  """
  rows = sorted(rows, key=lambda r: r["payment"])
  r = np.array([row["payment"] for row in rows])
  u = np.array([row["objective"] for row in rows])
  se = np.array([row["objective_stderr"] for row in rows])
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  (line,) = ax.plot(r, u, marker="o", ms=3, label="U(R), mean over held-out draws")
  ax.fill_between(r, u - se, u + se, color=line.get_color(), alpha=0.2, label="+-1 standard error")
  half = 0.25 * (np.min(np.diff(r)) if r.size > 1 else max(abs(r[0]), 1.0))
  dx = np.array([-half, half])
  tangents = [(x, y, row["grad"]) for x, y, row in zip(r, u, rows) if np.isfinite(row["grad"])]
  for i, (x, y, slope) in enumerate(tangents):  # a non-finite gradient gets no tangent
    ax.plot(x + dx, y + slope * dx, color="black", lw=1.2, label="dU/dR" if i == 0 else None)
  for key, label, color in (("is_R_Q", "R*_Q", "tab:orange"), ("is_R_trained", "R*_trained", "tab:green")):
    for row in rows:
      if row[key]:
        ax.axvline(row["payment"], color=color, ls="--", lw=1, label=label)
  ax.set(
    xlabel="payment R",
    ylabel=f"U = {lambda_acc:g} (-validation loss) - R",
    title="Trained objective along R, hypergradient tangents",
  )
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return _save(fig, path)
