"""``report.html``: one self-contained page per run (every image inlined as a data URI; the PNGs
it draws are also written next to it): the stage table, the funnel (URLs -> downloaded ->
kept by the ALIGN filters -> indexed) with the drop reasons of each stage, the filter's own
plots, the training curves, the retrieval metrics and a grid of text -> image search results."""

from __future__ import annotations

import base64
import html
import io
import json
import time
from typing import Any

from align_ray import storage
from align_ray.workflow.config import RunConfig


def _read(uri: str) -> bytes | None:
    fs, path = storage.filesystem(uri)
    return storage.read_bytes(fs, path) if storage.exists(fs, path) else None


def _png_uri(data: bytes | None) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii") if data else ""


def _img(data: bytes | None, alt: str, width: int = 0) -> str:
    if not data:
        return f"<p class=missing>({html.escape(alt)}: not available)</p>"
    w = f' width="{width}"' if width else ""
    return f'<img src="{_png_uri(data)}" alt="{html.escape(alt)}"{w}>'


def funnel(cfg: RunConfig, stages: dict) -> list[tuple[str, int]]:
    data = (stages.get("data") or {}).get("summary") or {}
    filt = (stages.get("filter") or {}).get("summary") or {}
    idx = (stages.get("index") or {}).get("summary") or {}
    steps = []
    if "input_rows" in data:
        steps.append(("input URLs", int(data["input_rows"])))
        steps.append(("downloaded", int(data["output_rows"])))
    if "output_rows" in filt:
        steps.append(("kept by the ALIGN filters", int(filt["output_rows"])))
    if "count" in idx:
        steps.append(("indexed", int(idx["count"])))
    return steps


def funnel_png(steps: list[tuple[str, int]]) -> bytes | None:
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 0.55 * len(steps) + 0.8))
    names, counts = [s[0] for s in steps][::-1], [s[1] for s in steps][::-1]
    bars = ax.barh(names, counts, color=["#4c72b0", "#55a868", "#c44e52", "#8172b2"][:len(steps)][::-1])
    top = max(counts) or 1
    for b, c in zip(bars, counts):
        ax.text(b.get_width() + top * 0.01, b.get_y() + b.get_height() / 2,
                f"{c} ({100 * c / top:.0f}%)", va="center", fontsize=9)
    ax.set_xlim(0, top * 1.25)
    ax.set_title("rows per stage")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _drops_table(title: str, dropped: dict[str, int]) -> str:
    if not dropped:
        return f"<p>{html.escape(title)}: nothing dropped</p>"
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{v}</td></tr>"
                   for k, v in dropped.items())
    return f"<table><caption>{html.escape(title)}</caption><tr><th>reason</th><th>rows</th></tr>{rows}</table>"


def _stage_table(stages: dict) -> str:
    rows = []
    for name, rec in stages.items():
        err = html.escape(rec.get("error", ""))
        rows.append(f"<tr><td>{name}</td><td class={rec['status']}>{rec['status']}</td>"
                    f"<td>{rec.get('seconds', '')}</td><td>{err}</td></tr>")
    return ("<table><tr><th>stage</th><th>status</th><th>seconds</th><th>error</th></tr>"
            + "".join(rows) + "</table>")


def _nodes_table(nodes: dict) -> str:
    """Per stage: live nodes, the nodes that ran its work, the peak CPUs in use
    (workflow/nodes.py samples the GCS)."""
    per = nodes.get("per_stage") or {}
    if not per:
        return "<p>(no node samples)</p>"
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{s['alive_min']}&ndash;{s['alive_max']}</td>"
        f"<td>{s['busy_nodes']}</td><td>{s['busy_max']}</td><td>{s['cpus_max']:g}</td></tr>"
        for n, s in per.items())
    return ("<table><tr><th>stage</th><th>nodes alive</th><th>nodes that ran work</th>"
            "<th>busy at once (max)</th><th>CPUs in use (max)</th></tr>" + rows + "</table>"
            f"<p>Sampled every {nodes.get('interval_s')} s; every sample is in workflow.json "
            "(<code>nodes.samples</code>).</p>")


def _metrics_table(ev: dict) -> str:
    dirs = [d for d in ("image_to_text", "text_to_image") if d in ev]
    if not dirs:
        return "<p class=missing>(no retrieval metrics)</p>"
    keys = ["R@1", "R@5", "R@10", "mean_rank", "median_rank"]
    head = "".join(f"<th>{k}</th>" for k in keys)
    body = ""
    for d in dirs:
        body += f"<tr><td>{d.replace('_', ' ')}</td>" + "".join(
            f"<td>{ev[d].get(k, ''):.3g}</td>" if isinstance(ev[d].get(k), (int, float))
            else f"<td>{ev[d].get(k, '')}</td>" for k in keys) + "</tr>"
    chance = ev.get("chance", {})
    if chance:
        body += "<tr><td>chance</td>" + "".join(
            f"<td>{chance[k]:.3g}</td>" if isinstance(chance.get(k), (int, float)) else "<td></td>"
            for k in keys) + "</tr>"
    src = html.escape(str(ev.get("source", "")))
    return (f"<p>{src}; n = {ev.get('n', '?')} pairs</p><table><tr><th></th>{head}</tr>"
            f"{body}</table>")


def _examples(results: list[dict]) -> str:
    if not results:
        return "<p class=missing>(the serve stage did not run: no example queries)</p>"
    out = []
    for r in results:
        cells = "".join(
            f'<figure><img src="{h["thumb"]}" alt="hit {h["id"]}"><figcaption>'
            f'{h["score"]:+.3f} #{h["id"]}<br>{html.escape(str(h.get("text", ""))[:80])}'
            f"</figcaption></figure>" for h in r["hits"])
        out.append(f'<div class=query><h3>"{html.escape(r["query"])}" '
                   f'<small>({r["ms"]} ms)</small></h3><div class=grid>{cells}</div></div>')
    return "".join(out)


def _training(cfg: RunConfig, train_out: str) -> tuple[str, bytes | None]:
    curves = _read(f"{train_out}/curves.png")
    raw = _read(f"{train_out}/metrics.jsonl")
    records = [json.loads(x) for x in raw.decode().splitlines() if x.strip()] if raw else []
    logs = [r for r in records if "loss" in r]
    text = ""
    if logs:
        text = (f"<p>{len(logs)} logged steps; loss {logs[0]['loss']:.3f} (step {logs[0]['step']})"
                f" &rarr; {logs[-1]['loss']:.3f} (step {logs[-1]['step']}); temperature "
                f"{logs[-1].get('temperature', float('nan')):.4f}. Raw log: "
                f"<code>{html.escape(train_out)}/metrics.jsonl</code></p>")
    return text, curves


def _round2(cfg: RunConfig, stages: dict) -> str:
    """Round 2 (bootstrap): what the score filter kept, the score histogram, both models on
    the same held-out rows."""
    if not cfg.bootstrap.enabled:
        return ""
    f2 = (stages.get("filter2") or {}).get("summary") or {}
    ev = (stages.get("eval2") or {}).get("summary") or {}
    out = f"<h2>Round 2: the score filter</h2><p>filter2 kept " \
          f"{f2.get('output_rows', '?')} of {f2.get('input_rows', '?')} scored rows.</p>"
    out += "<div class=row>" + _drops_table("dropped by round 2's filter", f2.get("dropped", {}))
    out += _img(_read(f"{cfg.bootstrap.filter.output.rstrip('/')}/score.png"), "score.png", 520)
    out += "</div>"
    for name in ("round1", "round2"):
        if name in ev:
            out += f"<h3>{name.replace('round', 'round ')} model, the same held-out rows</h3>"
            out += _metrics_table(ev[name])
    return out


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left}caption{font-weight:600;text-align:left}.failed{color:#b00}.skipped{color:#777}
.grid{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:150px;font-size:11px}
figure img{width:150px;height:150px;object-fit:contain;background:#eee}.missing{color:#999}
.row{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}"""


def write(cfg: RunConfig, record: dict[str, Any], results: list[dict]) -> str:
    """Render report.html (+ funnel.png) under the run's output root; returns the page's URI."""
    stages = record.get("stages", {})
    steps = funnel(cfg, stages)
    fpng = funnel_png(steps)
    fs, root = storage.filesystem(cfg.output)
    if fpng:
        storage.write_bytes(fs, storage.join(root, "funnel.png"), fpng)
    data = (stages.get("data") or {}).get("summary") or {}
    filt = (stages.get("filter") or {}).get("summary") or {}
    filt_stage = (filt.get("stages") or {}).get("filter", {})
    ev = (stages.get("eval") or {}).get("summary") or {}
    train_text, curves = _training(cfg, cfg.train.output.rstrip("/"))
    fout = cfg.filter.output.rstrip("/")
    filter_pngs = "".join(_img(_read(f"{fout}/{n}"), n, 520)
                          for n in ("rules.png", "tokens.png", "image_size.png"))
    funnel_rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{c}</td></tr>" for n, c in steps)
    source = (f"the built-in noisy web ({cfg.web.rows} URLs, seed {cfg.web.seed})"
              if cfg.embedded else html.escape(cfg.data.input))
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>align-ray end-to-end report</title><style>{CSS}</style></head><body>
<h1>align-ray end-to-end report</h1>
<p>Output root <code>{html.escape(cfg.output)}</code>; input: {source}; written
{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; total {record.get('seconds', '?')} s.</p>
<h2>Stages</h2>{_stage_table(stages)}
<h3>Nodes per stage</h3>{_nodes_table(record.get("nodes") or {})}
<h2>Funnel</h2><div class=row><table><tr><th>step</th><th>rows</th></tr>{funnel_rows}</table>
{_img(fpng, "funnel.png")}</div>
<div class=row>{_drops_table("dropped by the download stage", data.get("dropped", {}))}
{_drops_table("dropped by the ALIGN filters", filt_stage.get("dropped", {}))}</div>
<h3>Filter report</h3><div class=row>{filter_pngs}</div>
<h2>Training</h2>{train_text}{_img(curves, "curves.png")}
<h2>Retrieval metrics</h2>{_metrics_table(ev)}
{_round2(cfg, stages)}
<h2>Example text &rarr; image searches</h2>{_examples(results)}
</body></html>"""
    storage.write_bytes(fs, storage.join(root, "report.html"), page.encode("utf-8"))
    return f"{cfg.output.rstrip('/')}/report.html"
