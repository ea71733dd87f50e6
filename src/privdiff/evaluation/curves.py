"""Training curves of a run (its ``train_log.jsonl``): loss and ε versus step, one colour per stage, as PNG bytes.

The report embeds them and saves them next to the numbers (``RUN/eval/loss.png``,
``RUN/eval/epsilon.png``). Drawn with matplotlib's Agg canvas, without pyplot's global state.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["COLORS", "Series", "epsilon_plot", "finite", "loss_plot", "stage_series"]


def smooth(y: np.ndarray) -> np.ndarray:
    """Bias-corrected exponential moving average over about 1/25 of the points (at least 5)."""
    alpha = 2.0 / (max(5, len(y) // 25) + 1)
    out, acc, weight = np.empty_like(y), 0.0, 0.0
    for i, v in enumerate(y):
        acc = (1 - alpha) * acc + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = acc / weight
    return out


@dataclass(frozen=True)
class Series:
    """One stage's values of one log key; ``color`` is the stage's in every plot."""

    stage: str
    color: str
    x: np.ndarray
    y: np.ndarray


COLORS = ("#2563eb", "#d97706", "#059669", "#7c3aed", "#dc2626")


def stage_series(log: list[dict[str, Any]], key: str) -> tuple[list[Series], float]:
    """The finite values of ``key`` per stage (in order of appearance), and the last step of all.

    Each stage counts its steps from zero, so x is the step plus the steps of the earlier stages:
    the stages lie end to end on one axis, the same in every plot.
    """
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for e in log:
        if finite(e.get("step")):
            by_stage.setdefault(str(e.get("stage", "train")), []).append(e)
    offset, out = 0.0, []
    for i, (stage, entries) in enumerate(by_stage.items()):
        pts = sorted((float(e["step"]), float(e[key])) for e in entries if finite(e.get(key)))
        if pts:
            x, y = np.array(pts).T
            out.append(Series(stage, COLORS[i % len(COLORS)], x + offset, y))
        offset += max(float(e["step"]) for e in entries)
    return out, offset


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def figure(draw: Callable[[Any], None], *, ylabel: str, last_step: float) -> bytes:
    """Render a matplotlib figure with the Agg backend (no pyplot: no global state) to PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.4, 3.3), dpi=160, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    draw(ax)
    ax.set_xlim(0, max(last_step, 1.0))
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def loss_plot(series: list[Series], *, last_step: float) -> bytes:
    def draw(ax: Any) -> None:
        for s in series:
            ax.plot(s.x, s.y, color=s.color, alpha=0.25, linewidth=0.8)
            ax.plot(s.x, smooth(s.y), color=s.color, linewidth=2, label=f"{s.stage} (smoothed)")
        ys = np.concatenate([s.y for s in series])
        if (ys > 0).all() and ys.max() / ys.min() > 20:
            ax.set_yscale("log")
        ax.legend(frameon=False, fontsize=8)
        ax.set_title("Training loss (faint: per step)", fontsize=10, loc="left")

    return figure(draw, ylabel="loss", last_step=last_step)


def epsilon_plot(series: list[Series], target: float | None, *, last_step: float) -> bytes:
    def draw(ax: Any) -> None:
        for s in series:
            ax.plot(s.x, s.y, color=s.color, linewidth=2, label=s.stage)
        if target is not None:
            ax.axhline(target, color="#6b7280", linestyle="--", linewidth=1, label=f"target ε = {target:.4g}")
        ax.set_ylim(bottom=0)
        ax.legend(frameon=False, fontsize=8, loc="lower right")
        ax.set_title("Privacy spent ε (composed over all events so far)", fontsize=10, loc="left")

    return figure(draw, ylabel="ε", last_step=last_step)
