"""The single web page of ``d2r serve`` (plain HTML + JavaScript, no build step, no external assets)."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>d2r search</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .6em}
#controls{display:flex;gap:1em;flex-wrap:wrap;align-items:center;margin-bottom:.6em}
#pick{display:flex;gap:4px;flex-wrap:wrap;margin:.4em 0}
#pick img{height:56px;cursor:pointer;border:2px solid transparent}
#pick img:hover{border-color:#36c}
#querybox{position:relative;display:inline-block;user-select:none}
#qcanvas{max-width:480px;max-height:360px;border:1px solid #ccc;cursor:crosshair;display:block}
#status{margin:.5em 0;min-height:1.2em}
#status.error{color:#b00}
#results{display:flex;flex-wrap:wrap;gap:10px}
.hit{background:#fff;border:1px solid #ddd;padding:6px;width:260px;font-size:.85em}
.hit .frame{position:relative;display:inline-block}
.hit img{max-width:256px;max-height:256px;display:block}
.hit .region{position:absolute;border:2px solid #e33;box-sizing:border-box;pointer-events:none}
.hit .meta b{font-size:1.05em}
button{padding:.35em 1em}
</style></head>
<body>
<h1>d2r &mdash; instance search</h1>
<div id="controls">
  <label>Photo: <input type="file" id="file" accept="image/*"></label>
  <label>Box x1,y1,x2,y2: <input type="text" id="box" size="22" placeholder="whole image"></label>
  <label>Top <input type="number" id="topk" value="12" min="1" max="100" style="width:4em"></label>
  <label><input type="checkbox" id="rerank" checked> re-rank</label>
  <button id="search">Search</button>
  <button id="clearbox" type="button">Clear box</button>
</div>
<div>Or pick an indexed photo: <span id="count"></span></div>
<div id="pick"></div>
<div id="querybox"><canvas id="qcanvas" width="480" height="10"></canvas></div>
<div id="status"></div>
<div id="results"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let query = null;        // {file: File} or {id: string}
let img = null, scale = 1, drag = null;

function status(text, error) { const s = $("status"); s.textContent = text; s.className = error ? "error" : ""; }

function draw() {
  const c = $("qcanvas"), ctx = c.getContext("2d");
  if (!img) { c.height = 10; return; }
  scale = Math.min(480 / img.naturalWidth, 360 / img.naturalHeight, 1);
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

function show(src) { img = new Image(); img.onload = draw; img.src = src; }

$("file").addEventListener("change", () => {
  const f = $("file").files[0]; if (!f) return;
  query = {file: f}; $("box").value = ""; show(URL.createObjectURL(f));
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

async function loadPicks() {
  try {
    const r = await fetch("/api/images?limit=40"); const j = await r.json();
    $("count").textContent = "(" + j.total + " indexed)";
    const pick = $("pick"); pick.innerHTML = "";
    for (const id of j.ids) {
      const t = document.createElement("img"); t.src = "/api/thumb?size=128&id=" + encodeURIComponent(id);
      t.title = id; t.alt = id;
      t.onclick = () => { query = {id: id}; $("box").value = ""; $("file").value = "";
        show("/api/image?id=" + encodeURIComponent(id)); };
      pick.appendChild(t);
    }
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
    frame.appendChild(t);
    if (h.box && h.width) {
      t.onload = () => { const f = t.width / h.width; const d = document.createElement("div");
        d.className = "region"; d.style.left = h.box[0] * f + "px"; d.style.top = h.box[1] * f + "px";
        d.style.width = (h.box[2] - h.box[0]) * f + "px"; d.style.height = (h.box[3] - h.box[1]) * f + "px";
        frame.appendChild(d); };
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
loadPicks();
</script>
</body></html>
"""
