"""The single web page of ``d2r serve`` (plain HTML + JavaScript, no build step, no external assets).

Its script and style are inline; :data:`PAGE_CSP` allows exactly those two (by their SHA-256), images from the
server itself (and the preview of a chosen file, a ``blob:`` URL), requests to the server itself, and nothing
else: no other script, no framing.
"""

import base64
import hashlib

STYLE = """
body{font-family:system-ui,sans-serif;margin:1em 1.2em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .5em}
#controls{display:flex;gap:1em;flex-wrap:wrap;align-items:center;margin-bottom:.5em}
#topk{width:4em}
#picker{display:flex;gap:.6em;align-items:center;margin:.3em 0}
#pick{display:flex;gap:4px;overflow-x:auto;padding-bottom:4px;min-height:60px}
#pick img{height:56px;cursor:pointer;border:2px solid transparent;flex:none}
#pick img:hover,#pick img.chosen{border-color:#36c}
#main{display:flex;gap:1.2em;align-items:flex-start}
#left{flex:none;width:420px}
#right{flex:1;min-width:0}
#qcanvas{max-width:400px;max-height:300px;border:1px solid #ccc;cursor:crosshair;display:block}
#qname{margin:.3em 0;font-size:.9em;word-break:break-all}
#status{margin:.3em 0;min-height:1.2em}
#status.error{color:#b00}
#results{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.hit{background:#fff;border:1px solid #ddd;padding:6px;font-size:.85em}
.hit .frame{position:relative;display:inline-block;max-width:100%}
.hit img{max-width:100%;max-height:256px;display:block}
.hit .region{position:absolute;border:2px solid #e33;box-sizing:border-box;pointer-events:none}
.hit .meta{word-break:break-all}
.hit .meta b{font-size:1.05em}
button{padding:.35em 1em}
@media (max-width:800px){#main{flex-direction:column}#left{width:auto}}
"""

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
let query = null;        // {file: File} or {id: string}
let img = null, scale = 1, drag = null;

function status(text, error) { const s = $("status"); s.textContent = text; s.className = error ? "error" : ""; }

function draw() {
  const c = $("qcanvas"), ctx = c.getContext("2d");
  if (!img) { c.height = 10; return; }
  scale = Math.min(400 / img.naturalWidth, 300 / img.naturalHeight, 1);
  c.width = Math.round(img.naturalWidth * scale); c.height = Math.round(img.naturalHeight * scale);
  ctx.drawImage(img, 0, 0, c.width, c.height);
  const b = parseBox();
  if (b) { ctx.strokeStyle = "#e33"; ctx.lineWidth = 2;
    ctx.strokeRect(b[0] * scale, b[1] * scale, (b[2] - b[0]) * scale, (b[3] - b[1]) * scale); }
}

function parseBox() {
  const t = $("box").value.trim(); if (!t) return null;
  const v = t.split(",").map(Number); return v.length === 4 && v.every(isFinite) ? v : null;
}

function show(src, label) {
  img = new Image(); img.onload = () => { draw();
    $("qname").textContent = label + " (" + img.naturalWidth + "\u00d7" + img.naturalHeight + ")"; };
  img.src = src; $("qname").textContent = label;
}

$("file").addEventListener("change", () => {
  const f = $("file").files[0]; if (!f) return;
  query = {file: f}; $("box").value = ""; mark(null); show(URL.createObjectURL(f), "Query: file " + f.name);
});
$("box").addEventListener("input", draw);
$("clearbox").addEventListener("click", () => { $("box").value = ""; draw(); });

const canvas = $("qcanvas");
function pos(e) { const r = canvas.getBoundingClientRect();
  return [Math.max(0, Math.min(canvas.width, e.clientX - r.left)) / scale,
          Math.max(0, Math.min(canvas.height, e.clientY - r.top)) / scale]; }
canvas.addEventListener("mousedown", (e) => { if (img) drag = pos(e); });
window.addEventListener("mousemove", (e) => { if (!drag) return; const p = pos(e);
  const b = [Math.min(drag[0], p[0]), Math.min(drag[1], p[1]), Math.max(drag[0], p[0]), Math.max(drag[1], p[1])];
  $("box").value = b.map(Math.round).join(","); draw(); });
window.addEventListener("mouseup", () => { drag = null; });

function mark(id) {
  for (const t of $("pick").children) t.classList.toggle("chosen", t.title === id);
}

function pickId(id) {
  query = {id: id}; $("box").value = ""; $("file").value = ""; mark(id);
  show("/api/image?id=" + encodeURIComponent(id), "Query: indexed image " + id);
}

let listing = 0;
async function loadPicks() {
  const ticket = ++listing, q = $("find").value.trim();
  try {
    const r = await fetch("/api/images?limit=40" + (q ? "&q=" + encodeURIComponent(q) : ""));
    const j = await r.json();
    if (ticket !== listing) return;  // a newer filter was typed meanwhile
    if (!r.ok) { status("cannot list the index: " + j.error, true); return; }
    $("count").textContent = q ? j.total + " match" + (j.total === 1 ? "" : "es") +
      (j.total > j.ids.length ? " (first " + j.ids.length + " shown)" : "") :
      "(" + j.total + " indexed" + (j.total > j.ids.length ? ", first " + j.ids.length + " shown" : "") + ")";
    const pick = $("pick"); pick.innerHTML = "";
    for (const id of j.ids) {
      const t = document.createElement("img"); t.src = "/api/thumb?size=128&id=" + encodeURIComponent(id);
      t.title = id; t.alt = id; t.onclick = () => pickId(id);
      pick.appendChild(t);
    }
    if (query && query.id) mark(query.id);
  } catch (e) { status("cannot list the index: " + e, true); }
}

async function search() {
  if (!query) { status("choose a photo first (upload or pick one)", true); return; }
  const form = new FormData();
  if (query.file) form.append("file", query.file); else form.append("id", query.id);
  const box = parseBox();  // always in pixels of the original photo (the preview is drawn scaled)
  if (box) form.append("box", box.map((v) => Math.round(v)).join(","));
  form.append("top_k", $("topk").value || "12");
  form.append("rerank", $("rerank").checked ? "true" : "false");
  status("searching...");
  $("results").innerHTML = "";
  try {
    const r = await fetch("/api/search", {method: "POST", body: form});
    const j = await r.json();
    if (!r.ok) { status("error " + r.status + ": " + j.error, true); return; }
    status(j.hits.length + " results in " + (j.seconds * 1000).toFixed(0) + " ms");
    render(j.hits);
  } catch (e) { status("request failed: " + e, true); }
}

function render(hits) {
  const out = $("results");
  for (const h of hits) {
    const card = document.createElement("div"); card.className = "hit";
    const frame = document.createElement("div"); frame.className = "frame";
    const t = document.createElement("img"); t.src = h.thumb; t.alt = h.image_id;
    t.title = "query with " + h.image_id; t.onclick = () => pickId(h.image_id);
    frame.appendChild(t);
    if (h.box && h.width && h.height) {  // in percent of the image: right at any rendered size
      const d = document.createElement("div"); d.className = "region";
      d.style.left = 100 * h.box[0] / h.width + "%"; d.style.top = 100 * h.box[1] / h.height + "%";
      d.style.width = 100 * (h.box[2] - h.box[0]) / h.width + "%";
      d.style.height = 100 * (h.box[3] - h.box[1]) / h.height + "%";
      frame.appendChild(d);
    }
    const meta = document.createElement("div"); meta.className = "meta";
    meta.innerHTML = "<b>#" + h.rank + "</b> " + escape(h.image_id) + "<br>score " + h.score.toFixed(4) +
      " &middot; inliers " + (h.inliers < 0 ? "&ndash;" : h.inliers) +
      (h.box ? "<br>region " + h.box.map(Math.round).join(",") : "");
    card.appendChild(frame); card.appendChild(meta); out.appendChild(card);
  }
}

function escape(s) { const d = document.createElement("div"); d.textContent = s; return d.innerHTML; }

$("search").addEventListener("click", search);
let typing = null;
$("find").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(loadPicks, 200); });
loadPicks();
"""

PAGE = ("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>d2r search</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>""" + STYLE + """</style></head>
<body>
<h1>d2r &mdash; instance search</h1>
<div id="controls">
  <label>Photo: <input type="file" id="file" accept="image/*"></label>
  <label>Box x1,y1,x2,y2: <input type="text" id="box" size="22" placeholder="whole image"></label>
  <label>Top <input type="number" id="topk" value="12" min="1" max="100"></label>
  <label><input type="checkbox" id="rerank" checked> re-rank</label>
  <button id="search">Search</button>
  <button id="clearbox" type="button">Clear box</button>
</div>
<div id="picker">Or pick an indexed photo:
  <input type="search" id="find" placeholder="find an id" size="24"> <span id="count"></span></div>
<div id="pick"></div>
<div id="main">
  <div id="left">
    <canvas id="qcanvas" width="400" height="10"></canvas>
    <div id="qname"></div>
    <div id="status"></div>
  </div>
  <div id="right"><div id="results"></div></div>
</div>
<script>""" + SCRIPT + """</script>
</body></html>
""")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


PAGE_CSP = ("default-src 'none'; script-src " + _sha256(SCRIPT) + "; style-src " + _sha256(STYLE)
            + "; img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")
