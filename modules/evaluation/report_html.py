"""The `unclip evaluate` HTML report: one file, inline CSS, images by relative path, no scripts or
external resources, so the output folder opens offline anywhere."""

from __future__ import annotations

import html
import json
from typing import Any

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.3em .7em;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-family:monospace}
.grids{display:flex;gap:2em;flex-wrap:wrap} .grids img{image-rendering:pixelated;width:360px}
.gallery{display:flex;flex-wrap:wrap;gap:.8em} figure{margin:0;width:140px}
figure img{width:140px;image-rendering:pixelated;border:1px solid #ccc} figcaption{font-size:.75em}
.note{color:#666;font-size:.85em}
"""

METRIC_ROWS = (
    ("FID", "fid", None, "fid"),
    ("KID", "kid_mean", "kid_std", "kid"),
    ("Inception Score", "inception_score_mean", "inception_score_std", "inception_score"),
    ("CLIP score (generated)", "clip_score", None, "clip_score"),
    ("CLIP score (real)", "clip_score_real", None, "clip_score"),
)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.5g}"
    return html.escape(str(value))


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _metrics_table(report: dict[str, Any]) -> str:
    m, notes = report["metrics"], report["metric_notes"]
    head = "<tr><th>metric</th><th>value</th><th>std</th><th>definition</th></tr>"
    rows = "".join(
        f"<tr><td>{name}</td><td class=num>{_fmt(m.get(key))}</td><td class=num>{_fmt(m.get(std)) if std else ''}</td>"
        f"<td class=note>{html.escape(notes.get(note, ''))}</td></tr>"
        for name, key, std, note in METRIC_ROWS
    )
    return f"<table>{head}{rows}</table>"


def render_html(report: dict[str, Any]) -> str:
    """The report as a standalone HTML page (paths in `report['images']` are relative to it)."""
    src, data, images = report["source"], report["data"], report["images"]
    title = f"unclip evaluate: {src.get('stage')} — {src.get('checkpoint') or src.get('pipeline')}"
    grids = "".join(
        f"<figure style='width:auto'><img src='{html.escape(images[key])}' alt='{label}'><figcaption>{label}</figcaption></figure>"
        for key, label in (("samples_grid", "generated"), ("real_grid", "real"))
        if key in images
    )
    gallery = "".join(
        f"<figure><img src='{html.escape(s['path'])}' alt='sample {i}'><figcaption>{html.escape(s['caption'])}</figcaption></figure>"
        for i, s in enumerate(images["samples"])
    )
    source_rows = [(k, _fmt(v)) for k, v in src.items()]
    data_rows = [(k, _fmt(v)) for k, v in data.items()]
    settings = report["settings"]
    settings_rows = [(k, _fmt(v) if k != "sampling" else f"<code>{html.escape(json.dumps(v))}</code>") for k, v in settings.items()]
    fx = report["feature_extractor"]
    timing = ", ".join(f"{k} {v}" for k, v in report["timing"].items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(src.get('generator', ''))}; {data.get('num_generated')} generated vs {data.get('num_real')} real images.</p>
<h2>Metrics</h2>
{_metrics_table(report)}
<p class=note>Features: <b>{html.escape(fx['source'])}</b> — {html.escape(fx['description'])}</p>
<h2>Sample grids</h2>
<div class=grids>{grids}</div>
<h2>Samples and prompts</h2>
<div class=gallery>{gallery}</div>
<h2>Run</h2>
{_table(source_rows)}
{_table(data_rows)}
{_table(settings_rows)}
<p class=note>timing (s): {html.escape(timing)} · schema {html.escape(report['schema'])}</p>
</body></html>
"""
