"""The small search page served at ``GET /`` (plain HTML + fetch; no build step, no CDN).

Text box -> ``POST v1/search {"text", "modality": "image"}`` -> a grid of image hits (thumbnails
from ``GET v1/image/{id}``).  Image upload -> ``POST v1/search {"image", "modality": "text"}`` ->
the best captions.  URLs are relative to the app's route prefix (``root_path``).
"""

from __future__ import annotations

import html
import json

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<base href="__BASE__">
<title>align-ray search</title>
<style>
 body{font:15px system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem;color:#222}
 h1{font-size:1.4rem} form{display:flex;gap:.5rem;margin:.5rem 0 1rem}
 input[type=text]{flex:1;padding:.5rem;font-size:1rem} button{padding:.5rem 1rem}
 #grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(9rem,1fr));gap:.75rem}
 .hit{border:1px solid #ddd;border-radius:6px;padding:.4rem;font-size:.8rem;overflow:hidden}
 .hit img{width:100%;aspect-ratio:1;object-fit:cover;background:#f4f4f4}
 .score{color:#777} #error{color:#b00020;min-height:1.2em} #captions li{margin:.3rem 0}
 #preview{max-width:8rem;max-height:8rem;display:none}
</style></head><body>
<h1>align-ray: image &harr; text search</h1>
<p class="score">__INFO__</p>
<form id="text-form"><input type="text" id="q" placeholder="describe an image..." autocomplete="off">
<button id="search-btn" type="submit">Search images</button></form>
<form id="image-form"><label>Find captions for an image: <input type="file" id="file" accept="image/*">
</label><img id="preview" alt="query image"></form>
<div id="error" role="alert"></div>
<div id="status" class="score"></div>
<div id="grid"></div>
<ol id="captions"></ol>
<script>
const K = __K__;
const $ = (id) => document.getElementById(id);
function showError(msg) { $("error").textContent = msg || ""; }
async function search(body) {
  showError(""); $("status").textContent = "searching...";
  const r = await fetch("v1/search", {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify(body)});
  const data = await r.json().catch(() => ({}));
  $("status").textContent = "";
  if (!r.ok) { showError(data.detail || ("HTTP " + r.status)); return null; }
  return data.results;
}
function text(tag, cls, s) { const e = document.createElement(tag); if (cls) e.className = cls;
                             e.textContent = s; return e; }
$("text-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const q = $("q").value.trim(); if (!q) { showError("type something first"); return; }
  const hits = await search({text: q, k: K, modality: "image"}); if (!hits) return;
  $("captions").replaceChildren(); const grid = $("grid"); grid.replaceChildren();
  for (const h of hits) {
    const card = document.createElement("div"); card.className = "hit"; card.dataset.id = h.id;
    const img = document.createElement("img"); img.alt = h.text || ""; img.loading = "eager";
    img.src = h.image_url || h.url || "";
    card.append(img, text("div", "caption", h.text || ""), text("div", "score", h.score.toFixed(3)));
    grid.append(card);
  }
  $("status").textContent = hits.length + " images";
});
$("file").addEventListener("change", () => {
  const f = $("file").files[0]; if (!f) return;
  const reader = new FileReader();
  reader.onload = async () => {
    $("preview").src = reader.result; $("preview").style.display = "block";
    const b64 = String(reader.result).split(",", 2)[1] || "";
    const hits = await search({image: b64, k: Math.min(K, 10), modality: "text", dedup: true});
    if (!hits) return;
    $("grid").replaceChildren(); const list = $("captions"); list.replaceChildren();
    for (const h of hits) {
      const li = text("li", "caption", h.text || ""); li.dataset.id = h.id;
      li.append(" ", text("span", "score", "(" + h.score.toFixed(3) + ")")); list.append(li);
    }
    $("status").textContent = hits.length + " captions";
  };
  reader.readAsDataURL(f);
});
</script></body></html>
"""


def render(info: str, k: int, root_path: str = "") -> str:
    base = html.escape(root_path.rstrip("/") + "/", quote=True)
    return (_PAGE.replace("__BASE__", base).replace("__INFO__", html.escape(info))
            .replace("__K__", json.dumps(int(k))))
