"""``privdiff compare RUN [RUN ...]``: one table across evaluated runs, printed and saved as CSV and Markdown.

Rows are read from each run's ``metrics.json``. FID/KID/precision/recall are only comparable on
the same feature network, so the table names it, and a footnote says so when runs differ.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..runs import Run, RunError

COLUMNS = (
    "run",
    "method",
    "epsilon",
    "delta",
    "fid",
    "kid",
    "precision",
    "recall",
    "acc_cnn",
    "acc_logreg",
    "train_time_s",
    "n_samples",
    "features",
)


def comparison_row(run_dir: str | Path) -> dict[str, Any]:
    """One row of the comparison table for an evaluated run."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise RunError(f"{run_dir}: no metrics.json (run: privdiff evaluate {run_dir})")
    try:
        m = json.loads(path.read_text())
        metrics, privacy = m["metrics"], m["privacy"]
        value = lambda key: metrics.get(key, {}).get("value")  # noqa: E731
        return {
            "run": str(run_dir),
            "method": m["method"],
            "epsilon": privacy["epsilon"] if privacy["private"] else float("inf"),
            "delta": privacy["delta"],
            "fid": value("fid"),
            "kid": value("kid"),
            "precision": value("precision"),
            "recall": value("recall"),
            "acc_cnn": value("accuracy_cnn"),
            "acc_logreg": value("accuracy_logreg"),
            "train_time_s": m.get("train_time_s"),
            "n_samples": m["samples"]["n"],
            "features": f"{m['features']['name']}:{m['features']['sha256'].split(':')[-1][:8]}",
        }
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path}: not a privdiff metrics file ({type(e).__name__}: {e})") from None


def stale_metrics(run_dir: str | Path) -> str | None:
    """One line when ``RUN/metrics.json`` is older than the run's latest checkpoint (the run trained on
    after it was evaluated, so its row describes an earlier model), else None. The step that
    ``metrics.json`` records is compared with the latest checkpoint's; a file without one is compared by
    modification time. Never raises: a run whose checkpoints cannot be read is for other commands to report."""
    run = Run(run_dir)
    path = run.path / "metrics.json"
    try:
        latest = run.latest_checkpoint()
        if latest is None or not path.is_file():
            return None
        latest_step = int(latest.name.split("-")[-1])
        recorded = json.loads(path.read_text()).get("checkpoint_step")
        if isinstance(recorded, int) and not isinstance(recorded, bool):
            stale = recorded < latest_step
            what = f"evaluated at step {recorded}"
        else:
            stale = path.stat().st_mtime < latest.stat().st_mtime
            what = "written before it"
    except (OSError, ValueError, AttributeError, RunError):
        return None
    if not stale:
        return None
    return (
        f"{run_dir}: metrics.json is older than the latest checkpoint (step {latest_step}; {what}): "
        f"its row describes an earlier model (privdiff evaluate {run_dir} measures the latest)"
    )


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == float("inf"):
            return "inf"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (with a note when the feature networks differ)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    if len({r["features"] for r in rows}) > 1:
        lines.append(
            "\nFID/KID/precision/recall were computed on different feature networks: compare them only within one."
        )
    return "\n".join(lines) + "\n"


def text_table(rows: list[dict[str, Any]]) -> str:
    """The rows aligned for a terminal."""
    cells = [list(COLUMNS)] + [[_fmt(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells)


def compare_runs(
    runs: list[str | Path], *, out: str | Path | None = None
) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Rows for ``runs``; with ``out``, writes ``out.csv`` and ``out.md`` (atomically) and returns their paths."""
    rows = [comparison_row(r) for r in runs]
    written: dict[str, Path] = {}
    if out is not None:
        base = Path(out)
        base = base.with_suffix("") if base.suffix in (".csv", ".md") else base
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
        written = {"csv": base.with_suffix(".csv"), "md": base.with_suffix(".md")}
        atomic_write_text(written["csv"], buf.getvalue())
        atomic_write_text(written["md"], markdown_table(rows))
    return rows, written
