"""Metrics of a membership-inference attack from its scores (higher score = "member").

AUC and the ROC come from ``sklearn.metrics``; ASR is the best balanced accuracy over all
thresholds (SecMI / SimA); TPR at a low FPR is the highest TPR whose FPR does not exceed the
target. With n non-members the smallest non-zero FPR is 1/n, so a target below 1/n is *not
resolvable*: it is reported as None, with a note, rather than as a number it cannot support.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from ..atomic import atomic_write_bytes

__all__ = ["FPR_TARGETS", "attack_metrics", "tpr_at_fpr", "save_roc_plot"]

FPR_TARGETS: dict[str, float] = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0.1pct_fpr": 0.001}


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """max TPR over the ROC points with FPR ≤ ``target`` (a threshold that never exceeds the target FPR)."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict:
    """AUC, ASR, TPR at 1% and 0.1% FPR, the counts, and the ROC curve of scores (member ⇔ high).

    Returns:
        A dict with ``auc``, ``asr``, ``tpr_at_1pct_fpr``, ``tpr_at_0.1pct_fpr`` (None when the
        target FPR is below 1/n_nonmembers), ``n_members``, ``n_nonmembers``, ``min_resolvable_fpr``,
        ``notes`` and ``roc`` (``fpr``, ``tpr`` lists).
    """
    m, n = np.asarray(member_scores, dtype=np.float64), np.asarray(nonmember_scores, dtype=np.float64)
    if m.ndim != 1 or n.ndim != 1 or len(m) == 0 or len(n) == 0:
        raise ValueError(f"need non-empty 1-d member and non-member scores, got {m.shape} and {n.shape}")
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise ValueError("attack scores contain NaN or inf")
    y = np.concatenate([np.ones(len(m)), np.zeros(len(n))])
    s = np.concatenate([m, n])
    fpr, tpr, _ = roc_curve(y, s)
    # ASR = max_τ ½(TPR(τ) + 1 − FPR(τ)): accuracy at the best threshold on a balanced set
    asr = float(np.max(0.5 * (tpr + 1.0 - fpr)))
    out = {
        "auc": float(roc_auc_score(y, s)),
        "asr": asr,
        "n_members": len(m),
        "n_nonmembers": len(n),
        "min_resolvable_fpr": 1.0 / len(n),
        "notes": [],
    }
    for key, target in FPR_TARGETS.items():
        if target < 1.0 / len(n):
            out[key] = None
            out["notes"].append(
                f"{key}: not resolvable with {len(n)} non-members (smallest non-zero FPR is 1/{len(n)})"
            )
        else:
            out[key] = tpr_at_fpr(fpr, tpr, target)
    out["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return out


def save_roc_plot(path: str | Path, curves: dict[str, dict], *, title: str) -> Path:
    """ROC curves ``{label: {"fpr", "tpr", "auc"}}`` with log-scale FPR, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.6), dpi=110)
    floor = 1e-3
    for label, c in curves.items():
        fpr = np.clip(np.asarray(c["fpr"]), floor, 1.0)
        ax.plot(fpr, c["tpr"], lw=1.6, label=f"{label} (AUC {c['auc']:.3f})")
    grid = np.logspace(np.log10(floor), 0, 100)
    ax.plot(grid, grid, ls="--", c="grey", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (log)")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
