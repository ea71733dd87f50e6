"""The run report: one self-contained HTML page that is the first thing people open.

``write_report(RUN)`` gathers what a run directory holds into ``RUN/report.html``::

    header      run, method, data set, checkpoint step, (ε, δ, accountant) or non-private, times
    metrics     RUN/metrics.json: value (± std), real-data floor/ceiling, notes, feature network
    samples     RUN/eval/samples.npz: a class-by-row grid, pixels enlarged (nearest neighbour)
    curves      RUN/train_log.jsonl: loss and ε versus step (also RUN/eval/loss.png, epsilon.png)
    ledger      RUN/ledger.json: every event and the ε they compose to
    attacks     RUN/attacks/*.json: membership-inference results and their ROC plots

The page must open offline, mailed or copied anywhere: every image is an embedded base64 PNG,
the CSS is inline and nothing refers to a network or file address. A section whose input does
not exist yet says so ("not available: ..." and the command that makes it) instead of failing,
so the report can be written at any point of a run's life.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_bytes, atomic_write_text
from ..config import Recipe
from ..privacy.ledger import Ledger
from ..runs import Run, RunError, image_grid
from .curves import epsilon_plot, finite, loss_plot, stage_series

REPORT_NAME = "report.html"
PER_CLASS = 10  # sample grid: images per class row
SAMPLE_PX = 64  # sample grid: small images are enlarged (whole pixels, nearest) to about this width
PAD = 2  # sample grid: white pixels between images (before enlarging)
MAX_ROWS = 20  # sample grid: at most this many class rows (e.g. CIFAR-100 shows the first 20)

# The commands that create each input; named in the "not available" lines.
TRAIN_CMD = "privdiff train RECIPE --out RUN"
EVALUATE_CMD = "privdiff evaluate RUN"
ATTACK_CMD = "privdiff attack RUN"

# Display names of the known metric keys; others are shown by their key.
METRIC_NAMES: dict[str, str] = {
    "fid": "FID",
    "kid": "KID",
    "precision": "Precision",
    "recall": "Recall",
    "accuracy_cnn": "Accuracy, CNN trained on synthetic",
    "accuracy_logreg": "Accuracy, logistic regression trained on synthetic",
    "class_consistency": "Class consistency: samples the real-data CNN puts in their intended class",
}
# Metrics computed in the feature space of metrics.json's "features" network.
FEATURE_METRICS = ("fid", "kid", "precision", "recall")


def write_report(run_dir: str | Path, *, out: str | Path | None = None) -> Path:
    """Write the report page of ``run_dir`` to ``out`` (default ``RUN/report.html``), atomically.

    Raises :class:`privdiff.runs.RunError` (writing nothing) if ``run_dir`` has no config.yaml;
    every other missing input becomes a "not available" line on the page. As a side effect the
    training curves are also saved as ``RUN/eval/loss.png`` and ``RUN/eval/epsilon.png``.
    """
    run = Run(run_dir)
    recipe = run.load_config()
    out = run.path / REPORT_NAME if out is None else Path(out)

    metrics, metrics_problem = _read_json(run.path / "metrics.json")
    ledger, ledger_problem = _read_ledger(run)
    epsilon = None  # of the ledger's events; inf if one ran without noise
    if ledger is not None:
        try:
            epsilon = ledger.epsilon()
        except (ValueError, ArithmeticError) as e:  # e.g. a hand-edited event the accountant rejects
            ledger, ledger_problem = None, f"ledger.json: cannot compose ε ({e})"
    log = run.read_train_log()
    sections = [
        _metrics_section(metrics, metrics_problem),
        _samples_section(run, metrics),
        _curves_section(run, log, ledger, recipe),
        _ledger_section(ledger, epsilon, ledger_problem),
        _attacks_section(run),
    ]
    header = _header(run, recipe, metrics, ledger, epsilon, log)
    title = f"{run.path.resolve().name} · privdiff report"
    atomic_write_text(out, _page(title, header, sections))
    return out


# -- inputs ---------------------------------------------------------------------------------------
def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(content, None)``, or ``(None, why not)`` for a missing or unreadable file."""
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"{path.name} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a JSON object"
    return data, None


def _read_ledger(run: Run) -> tuple[Ledger | None, str | None]:
    if not run.ledger_path.is_file():
        return None, f"no ledger.json yet (written by {TRAIN_CMD} before the first step)"
    try:
        return Ledger.load(run.ledger_path), None
    except (OSError, ValueError) as e:
        return None, str(e)


# -- formatting -----------------------------------------------------------------------------------
def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    """A number in ``digits`` significant digits (ints with thousands separators); anything else as escaped text."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _esc(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if math.isnan(value):
        return "NaN"
    return f"{value:.{digits}g}"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "—"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _unavailable(why: str) -> str:
    return f'<p class="na">not available: {_esc(why)}</p>'


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], *, numeric: Sequence[int] = ()) -> str:
    """An HTML table; cells are already-escaped HTML; columns in ``numeric`` are right-aligned."""
    cls = lambda i: ' class="num"' if i in numeric else ""  # noqa: E731
    thead = "".join(f"<th{cls(i)}>{h}</th>" for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{thead}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str, *, cls: str = "") -> str:
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    klass = f' class="{cls}"' if cls else ""
    return f'<img{klass} alt="{_esc(alt)}" src="{src}">'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_esc(title)}</h2>{body}</section>'


# -- header ---------------------------------------------------------------------------------------
def _checkpoint_step(run: Run, metrics: dict[str, Any] | None) -> int | None:
    """The evaluated checkpoint's step (metrics.json), else the latest checkpoint's."""
    if metrics and isinstance(metrics.get("checkpoint_step"), int):
        return metrics["checkpoint_step"]
    try:
        latest = run.latest_checkpoint()
    except RunError:
        return None
    try:
        return int(latest.name.removeprefix("step-")) if latest is not None else None
    except ValueError:
        return None


def _privacy_line(recipe: Recipe, metrics: dict[str, Any] | None, ledger: Ledger | None, eps: float | None) -> str:
    """ε (δ, accountant) from the ledger (the source of truth), else from metrics.json, else the recipe."""
    if ledger is not None and eps is not None:
        if math.isinf(eps):
            return "non-private"
        target = f", target {_num(ledger.target_epsilon)}" if ledger.target_epsilon is not None else ""
        return f"ε = {_num(eps)} (δ = {_num(ledger.delta)}, {_esc(ledger.accountant)}{target})"
    p = (metrics or {}).get("privacy")
    if isinstance(p, dict):
        if not p.get("private", True) or p.get("epsilon") is None:
            return "non-private"
        return f"ε = {_num(p['epsilon'])} (δ = {_num(p.get('delta'))}, {_esc(p.get('accountant', '?'))})"
    if not recipe.privacy.enabled:
        return "non-private"
    return f"ε target {_num(recipe.privacy.epsilon)} (δ = {_num(recipe.privacy.delta)}; no ledger yet)"


def _header(
    run: Run,
    recipe: Recipe,
    metrics: dict[str, Any] | None,
    ledger: Ledger | None,
    eps: float | None,
    log: list[dict[str, Any]],
) -> str:
    step = _checkpoint_step(run, metrics)
    train_time = (metrics or {}).get("train_time_s")
    if train_time is None and log:
        train_time = max((e["time_s"] for e in log if finite(e.get("time_s"))), default=None)
    facts = [
        ("method", _esc(recipe.method)),
        ("data", _esc(recipe.data.name)),
        ("checkpoint", f"step {_num(step)}" if step is not None else "none yet"),
        ("privacy", _privacy_line(recipe, metrics, ledger, eps)),
        ("training time", _duration(train_time)),
        ("evaluated", _esc((metrics or {}).get("created", "not yet"))),
    ]
    written = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    dl = "".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in facts)
    nav = "".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in [
            ("metrics", "Metrics"),
            ("samples", "Samples"),
            ("curves", "Training"),
            ("ledger", "Privacy ledger"),
            ("attacks", "Attacks"),
        ]
    )
    return (
        f'<header><p class="kicker">privdiff run report</p><h1>{_esc(run.path.resolve().name)}</h1>'
        f'<p class="path">{_esc(run.path)} · report written {written}</p><dl class="facts">{dl}</dl><nav>{nav}</nav></header>'
    )


# -- metrics --------------------------------------------------------------------------------------
def _metrics_section(metrics: dict[str, Any] | None, problem: str | None) -> str:
    if metrics is None:
        return _section("metrics", "Metrics", _unavailable(f"{problem} (made by {EVALUATE_CMD})"))
    entries = metrics.get("metrics") or {}
    if not isinstance(entries, dict) or not entries:
        return _section("metrics", "Metrics", _unavailable(f"metrics.json lists no metrics (made by {EVALUATE_CMD})"))
    rows = []
    for key, m in entries.items():
        m = m if isinstance(m, dict) else {"value": m}
        better = m.get("better")
        name = _esc(METRIC_NAMES.get(key, key))
        if better in ("lower", "higher"):
            name += f' <span class="dir" title="{better} is better">{"↓" if better == "lower" else "↑"}</span>'
        value = f"<b>{_num(m.get('value'))}</b>"
        if m.get("std") is not None:
            value += f' <span class="pm">± {_num(m["std"], 2)}</span>'
        if m.get("real") is not None:
            kind = {"lower": "floor", "higher": "ceiling"}.get(better, "real data")
            real = f'<span class="tag">{kind}</span> {_num(m["real"])}'
            if m.get("real_std") is not None:
                real += f' <span class="pm">± {_num(m["real_std"], 2)}</span>'
            if m.get("real_desc"):
                real += f'<div class="sub">{_esc(m["real_desc"])}</div>'
        else:
            real = '<span class="muted">—</span>'
        rows.append([name, value, real, _esc(m.get("note", ""))])
    body = _table(["metric", "value", "real-data reference", "notes"], rows, numeric=(1,))
    body += (
        '<p class="sub">↓ lower is better (the real-data value is a <i>floor</i>), ↑ higher is better '
        "(it is a <i>ceiling</i>): both are measured between real train and test data.</p>"
    )
    if metrics.get("privacy_note"):  # what ε does not cover (statistics of the private data shown here)
        body += f'<p class="sub"><b>Privacy:</b> {_esc(metrics["privacy_note"])}</p>'
    return _section("metrics", "Metrics", body + _features_line(metrics, entries))


def _features_line(metrics: dict[str, Any], entries: dict[str, Any]) -> str:
    """Which network FID/KID/precision/recall are measured with, and on how many images."""
    shown = [METRIC_NAMES[k] for k in FEATURE_METRICS if k in entries]
    if not shown:
        return ""
    f = metrics.get("features") or {}
    what = f"<b>{_esc(f.get('name', 'unknown network'))}</b>"
    details = [
        f"trained on {_esc(f['trained_on'])}" if f.get("trained_on") else "",
        f"{_esc(f['dim'])}-d features" if f.get("dim") else "",
        f"<code>{_esc(str(f['sha256'])[:19])}…</code>" if f.get("sha256") else "",
    ]
    details = [d for d in details if d]
    s, d = metrics.get("samples") or {}, metrics.get("data") or {}
    sampler = s.get("sampler") or {}
    gen = f"{_num(s.get('n'))} generated samples"
    how = [
        f"seed {_esc(s['seed'])}" if "seed" in s else "",
        f"{_esc(sampler.get('name'))} {_esc(sampler.get('steps', '?'))} steps" if sampler.get("name") else "",
        f"guidance {_num(sampler['guidance'])}" if "guidance" in sampler else "",
        f"{_esc(s['labels'])} labels" if s.get("labels") else "",
    ]
    how = [h for h in how if h]
    gen += f" ({', '.join(how)})" if how else ""
    real = f"{_num(d.get('n_train'))} real training and {_num(d.get('n_test'))} real test images of {_esc(d.get('name', 'the data set'))}"
    details = f" ({', '.join(details)})" if details else ""
    if "inception" in str(f.get("name", "")).lower():
        caveat = "; compare with published Inception-FID only at equal sample counts"
    else:
        caveat = (
            ", <b>not Inception-v3</b>: do not compare them with published (Inception) FID, KID, precision or recall"
        )
    return (
        f'<p class="features">{", ".join(shown)} are measured in the feature space of {what}{details}'
        f"{caveat}. Computed on {gen} against {real}.</p>"
    )


# -- samples --------------------------------------------------------------------------------------
def _samples_section(run: Run, metrics: dict[str, Any] | None) -> str:
    path = run.path / "eval" / "samples.npz"
    if not path.is_file():
        return _section("samples", "Samples", _unavailable(f"no eval/samples.npz (made by {EVALUATE_CMD})"))
    try:
        with np.load(path) as z:
            images = np.asarray(z["images"], dtype=np.float32)
            labels = np.asarray(z["labels"]) if "labels" in z.files else np.zeros(0, dtype=np.int64)
    except (OSError, ValueError, KeyError) as e:
        return _section("samples", "Samples", _unavailable(f"eval/samples.npz is unreadable ({type(e).__name__}: {e})"))
    if images.ndim != 4 or len(images) == 0:
        return _section("samples", "Samples", _unavailable(f"eval/samples.npz holds no images (shape {images.shape})"))
    names = ((metrics or {}).get("data") or {}).get("class_names") or []
    n, _, h, w = images.shape
    scale = max(1, round(SAMPLE_PX / w))
    if len(labels) == n and (labels >= 0).all():
        classes = np.unique(labels)
        rows = []
        for i, c in enumerate(classes[:MAX_ROWS]):
            picked = images[labels == c][:PER_CLASS]
            if len(picked) < PER_CLASS:  # a class with few samples: fill its row with blanks
                picked = np.concatenate([picked, np.ones((PER_CLASS - len(picked), *images.shape[1:]), np.float32)])
            row = image_grid(picked, nrow=PER_CLASS, scale=scale, pad=PAD)
            if i < min(len(classes), MAX_ROWS) - 1:  # stacked rows share one padding strip, as columns do
                row = row.crop((0, 0, row.width, row.height - PAD * scale))
            label = names[c] if 0 <= c < len(names) else str(int(c))
            rows.append((label, _png(row)))
        grid = "".join(
            f"<tr><th>{_esc(label)}</th><td>{_img(png, f'samples of class {label}')}</td></tr>" for label, png in rows
        )
        grid = f'<div class="scroll"><table class="grid">{grid}</table></div>'
        shown = f"the first {PER_CLASS} samples of each class (one row per class)"
        if len(classes) > MAX_ROWS:
            shown += f", first {MAX_ROWS} of {len(classes)} classes"
    else:
        picked = images[: PER_CLASS * PER_CLASS]
        grid = f'<div class="grid scroll">{_img(_png(image_grid(picked, nrow=PER_CLASS, scale=scale, pad=PAD)), "unconditional samples")}</div>'
        shown = f"the first {len(picked)} samples (unconditional)"
    caption = (
        f'<p class="sub">From eval/samples.npz ({_num(n)} images, {h}×{w} px): {shown}; '
        f"pixels enlarged ×{scale} without smoothing.</p>"
    )
    return _section("samples", "Samples", grid + caption)


def _png(picture: Any) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def _curves_section(run: Run, log: list[dict[str, Any]], ledger: Ledger | None, recipe: Recipe) -> str:
    if not log:
        return _section("curves", "Training curves", _unavailable(f"no train_log.jsonl yet (written by {TRAIN_CMD})"))
    parts = []
    loss, last_step = stage_series(log, "loss")
    if loss:
        png = loss_plot(loss, last_step=last_step)
        atomic_write_bytes(run.path / "eval" / "loss.png", png)
        parts.append(f"<figure>{_img(png, 'training loss versus step', cls='curve')}</figure>")
    else:
        parts.append(_unavailable("train_log.jsonl has no loss values"))
    eps, _ = stage_series(log, "epsilon")
    if eps:
        target = (
            ledger.target_epsilon
            if ledger is not None
            else (recipe.privacy.epsilon if recipe.privacy.enabled else None)
        )
        png = epsilon_plot(eps, target, last_step=last_step)
        atomic_write_bytes(run.path / "eval" / "epsilon.png", png)
        parts.append(f"<figure>{_img(png, 'epsilon versus step', cls='curve')}</figure>")
    else:
        parts.append(_unavailable("no ε in train_log.jsonl: the run is non-private"))
    stages = list(dict.fromkeys(str(e.get("stage", "train")) for e in log))
    order = f", laid end to end: {_esc(' → '.join(stages))}" if len(stages) > 1 else f" of {_esc(stages[0])}"
    note = f'<p class="sub">{_num(len(log))} logged steps{order}; also saved as eval/loss.png and eval/epsilon.png.</p>'
    return _section("curves", "Training curves", f'<div class="plots">{"".join(parts)}</div>{note}')


# -- ledger ---------------------------------------------------------------------------------------
def _ledger_section(ledger: Ledger | None, eps: float | None, problem: str | None) -> str:
    if ledger is None or eps is None:
        return _section("ledger", "Privacy ledger", _unavailable(problem or "no ledger"))
    ds = ledger.dataset or {}
    rows = [
        [
            _esc(e.stage),
            _esc(e.mechanism),
            _num(e.noise_multiplier),
            _num(e.sample_rate),
            _num(e.max_grad_norm),
            _num(e.sensitivity),
            _num(e.steps),
            _esc(ds.get("name", "—")),
        ]
        for e in ledger.events
    ]
    if rows:
        table = _table(
            ["stage", "mechanism", "σ (noise)", "q (sample rate)", "C (clip norm)", "sensitivity", "steps", "data set"],
            rows,
            numeric=(2, 3, 4, 5, 6),
        )
    else:
        table = _unavailable("the ledger has no events yet: no private data was touched")
    if math.isinf(eps):
        composed = "<b>non-private</b>: at least one event ran without noise, so there is no finite ε for this run."
    else:
        target = f" — target ε = {_num(ledger.target_epsilon)}" if ledger.target_epsilon is not None else ""
        composed = (
            f"Composed: <b>ε = {_num(eps)}</b> at δ = {_num(ledger.delta)} ({_esc(ledger.accountant)} "
            f"accountant){target}."
        )
    data = (
        f'<p class="sub">Private data: {_esc(ds.get("name", "?"))}, N = {_num(ds.get("size"))}'
        + (f", fingerprint <code>{_esc(str(ds['fingerprint'])[:23])}</code>" if ds.get("fingerprint") else "")
        + ". Recompute ε from these events alone with <code>privdiff budget show RUN</code>.</p>"
    )
    public = ""
    if ledger.public_stages:
        prow = [
            [
                _esc(p["stage"]),
                _esc(p["data"].get("name")),
                _esc(p["data"].get("split")),
                _num(p["data"].get("size")),
                f"<code>{_esc(str(p['data'].get('fingerprint', ''))[:23])}</code>",
                _num(p.get("steps")),
            ]
            for p in ledger.public_stages
        ]
        public = '<p class="sub">Stages on public data only (not part of ε):</p>' + _table(
            ["stage", "public data", "split", "N", "fingerprint", "steps"], prow, numeric=(3, 5)
        )
    return _section("ledger", "Privacy ledger", f'<p class="composed">{composed}</p>{table}{data}{public}')


# -- attacks --------------------------------------------------------------------------------------
def _tpr(result: dict[str, Any], fpr: float) -> Any:
    key = {0.01: "tpr_at_1pct_fpr", 0.001: "tpr_at_0.1pct_fpr"}.get(fpr)
    if key in result:  # the DESIGN.md keys written by privdiff attack; None = not resolvable with n_nonmembers
        return "not resolvable" if result[key] is None else result[key]
    for k, v in (result.get("tpr_at_fpr") or {}).items():
        try:
            if math.isclose(float(k), fpr):
                return v
        except ValueError:
            continue
    return None


def _attacks_section(run: Run) -> str:
    folder = run.path / "attacks"
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        return _section(
            "attacks", "Membership-inference attacks", _unavailable(f"no attacks/*.json (made by {ATTACK_CMD})")
        )
    rows, plots, problems = [], [], []
    for f in files:
        result, problem = _read_json(f)
        if result is None:
            problems.append(f"attacks/{problem}")
            continue
        name = str(result.get("attack", f.stem))
        rows.append(
            [
                _esc(name),
                _num(result.get("auc"), 3),
                _num(result.get("asr"), 3),
                _num(_tpr(result, 0.01), 3),
                _num(_tpr(result, 0.001), 3),
                _num(result.get("n_members")),
                _num(result.get("n_nonmembers")),
            ]
        )
        roc = result.get("roc_png")
        if roc:
            png_path = folder / str(roc)
            png = png_path.read_bytes() if png_path.is_file() else b""
            if png.startswith(b"\x89PNG\r\n\x1a\n"):
                roc_img = _img(png, f"ROC of the {name} attack")
                plots.append(f'<figure class="roc">{roc_img}<figcaption>ROC: {_esc(name)} attack</figcaption></figure>')
            else:
                problems.append(f"attacks/{roc} ({name} ROC plot) is missing or not a PNG")
    body = ""
    if rows:
        body += _table(
            ["attack", "AUC", "ASR", "TPR @ 1% FPR", "TPR @ 0.1% FPR", "# members", "# non-members"],
            rows,
            numeric=(1, 2, 3, 4, 5, 6),
        )
        body += (
            '<p class="sub">AUC 0.5, ASR 0.5 and TPR equal to the FPR mean the attack does no better than '
            "guessing which images were in the training data.</p>"
        )
    body += "".join(_unavailable(p) for p in problems)
    if plots:
        body += f'<div class="plots">{"".join(plots)}</div>'
    return _section("attacks", "Membership-inference attacks", body)


# -- page -----------------------------------------------------------------------------------------
CSS = """
:root { --ink: #111827; --muted: #6b7280; --line: #e5e7eb; --soft: #f9fafb; --accent: #2563eb; }
* { box-sizing: border-box; }
body { margin: 0; background: #f3f4f6; color: var(--ink);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", "DejaVu Sans", Arial, sans-serif; }
main { max-width: 1040px; margin: 24px auto; padding: 28px 36px 36px; background: #fff;
       border: 1px solid var(--line); border-radius: 10px; }
header { border-bottom: 1px solid var(--line); padding-bottom: 14px; }
.kicker { margin: 0; color: var(--muted); font-size: 12px; letter-spacing: .08em; text-transform: uppercase; }
h1 { margin: 2px 0 0; font-size: 28px; }
.path { margin: 0 0 12px; color: var(--muted); font: 12px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; }
.facts { display: flex; flex-wrap: wrap; gap: 8px 28px; margin: 0; }
.facts dt { color: var(--muted); font-size: 12px; }
.facts dd { margin: 0; font-weight: 600; }
nav { margin-top: 14px; display: flex; gap: 16px; font-size: 13px; }
nav a { color: var(--accent); text-decoration: none; }
h2 { margin: 30px 0 10px; font-size: 19px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
#metrics th:nth-child(3) { width: 34%; }
th, td { padding: 7px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
thead th { background: var(--soft); color: #374151; font-weight: 600; font-size: 13px; border-bottom: 2px solid var(--line); }
tbody tr:hover { background: #fafafa; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.pm, .muted, .dir { color: var(--muted); }
.tag { display: inline-block; padding: 0 6px; border-radius: 9px; background: #eef2ff; color: #3730a3; font-size: 11px; }
.sub { color: var(--muted); font-size: 13px; margin: 6px 0 0; }
.features { margin: 12px 0 0; padding: 10px 14px; background: #fffbeb; border-left: 3px solid #f59e0b; font-size: 13.5px; }
.composed { margin: 0 0 10px; }
.na { color: var(--muted); font-style: italic; margin: 6px 0; padding: 6px 12px; border-left: 3px solid var(--line); background: var(--soft); }
code { font: 12.5px ui-monospace, "DejaVu Sans Mono", monospace; background: var(--soft); padding: 0 3px; border-radius: 3px; }
.scroll { overflow-x: auto; }
table.grid { width: auto; }
table.grid th { padding: 0 12px 0 0; border: 0; vertical-align: middle; text-align: right; font-weight: 600;
                color: #374151; white-space: nowrap; }
table.grid td { padding: 0; border: 0; }
table.grid tr:hover { background: none; }
.grid img { display: block; image-rendering: pixelated; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.plots figure { flex: 1 1 440px; margin: 0; }
.plots figure.roc { flex: 0 1 auto; }
.sub + .plots, .na + .plots { margin-top: 12px; }
.plots img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
.plots img.curve { width: 100%; }
figcaption { color: var(--muted); font-size: 13px; text-align: center; margin-top: 4px; }
@media (max-width: 720px) { main { margin: 0; padding: 18px 16px; border-radius: 0; } }
"""

# Marks the page once loaded so a headless browser can check every embedded image decoded.
SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
  document.body.dataset.imagesLoaded = ok + "/" + imgs.length;
});
"""


def _page(title: str, header: str, sections: list[str]) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head>\n"
        f"<body><main>{header}\n" + "\n".join(sections) + f"\n</main><script>{SCRIPT}</script></body></html>\n"
    )
