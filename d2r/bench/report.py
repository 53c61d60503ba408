"""``report.html`` of a revisitop run: the summary table, then every query (worst final Medium AP first) with its
image (and box), its AP at each stage and its top 10 at each stage as thumbnails marked positive / junk / wrong.

Thumbnails are small JPEG files written next to the page (``OUT/report/thumbs/``), one per image, never inline
copies of the photos; the page references them by relative path, so the run folder can be moved as a whole.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np

from d2r import _io
from d2r.eval.datasets import resolve_image

log = logging.getLogger(__name__)

THUMB = 160  # longer side in pixels
TOP = 10
_CSS = """
body{font-family:sans-serif;margin:16px;color:#222}
table.sum{border-collapse:collapse;margin-bottom:16px}
table.sum td,table.sum th{border:1px solid #bbb;padding:3px 8px;text-align:right}
.q{border-top:2px solid #888;padding:8px 0}
.row{display:flex;align-items:center;gap:4px;margin:3px 0}
.row .lab{width:150px;font-size:12px}
.t{display:inline-block;text-align:center;font-size:10px}
.t img{display:block;max-width:100px;max-height:80px;border:4px solid #999}
.pos img{border-color:#1a9b3c}.junk img{border-color:#aaa}.wrong img{border-color:#d62728}
.qimg img{max-width:160px;max-height:120px;border:2px solid #333}
"""

def _thumb(source: Path, dest: Path, box=None) -> bool:
    """Write a JPEG thumbnail (longer side THUMB) of ``source`` to ``dest``, with ``box`` [x1, y1, x2, y2] drawn;
    False when the image cannot be read (the page then shows the name only)."""
    if dest.is_file():
        return True
    try:
        from PIL import Image, ImageDraw

        with Image.open(source) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = THUMB / max(w, h)
            small = im.resize((max(1, round(w * scale)), max(1, round(h * scale))))
        if box is not None:
            x1, y1, x2, y2 = (float(v) * scale for v in box)
            ImageDraw.Draw(small).rectangle([x1, y1, x2, y2], outline=(255, 215, 0), width=2)
        import io

        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=80)
        _io.write_bytes(dest, buf.getvalue())
        return True
    except Exception as exc:  # a broken photo must not break the report
        log.warning("report: no thumbnail for %s (%s)", source, exc)
        return False


def write_revisitop_report(out, result: dict, g, stages: dict, images_root, query_in_database: bool,
                           protocol: str = "medium", progress: bool = False) -> Path:
    """Write ``OUT/report.html`` (and ``OUT/report/thumbs/*.jpg``); returns the page's path.

    result: the run's result dict (summary, per-query AP); g: GroundTruth; stages: {stage: {protocol: per-query
    rankings of database indices}}; marks follow ``protocol`` (positive / junk / wrong)."""
    out = Path(out)
    thumbs = out / "report" / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    root = Path(images_root)
    pos, junk = g.protocol(protocol, query_in_database=query_in_database)
    pq = result.get("per_query", {})
    names = list(stages)
    final = names[-1]
    ap_m = pq.get("medium", {}).get(final, [None] * g.num_queries)
    order = sorted(range(g.num_queries), key=lambda q: (ap_m[q] is None, ap_m[q] if ap_m[q] is not None else 0))

    made: dict[str, str | None] = {}

    def thumb_of(kind: str, index: int, name: str, box=None) -> str | None:
        key = f"{kind}{index}"
        if key not in made:
            try:
                src = resolve_image(root, name)
            except FileNotFoundError:
                made[key] = None
                return None
            rel = f"report/thumbs/{key}.jpg"
            made[key] = rel if _thumb(src, out / rel, box) else None
        return made[key]

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>d2r report</title><style>{_CSS}</style>"
             "</head><body>", "<h1>d2r bench revisitop</h1>", _summary(result, names)]
    parts.append(f"<p>Queries sorted by final Medium AP, worst first. Thumbnails: top {TOP} per stage, "
                 f"border green = positive, grey = junk, red = wrong ({protocol} protocol).</p>")
    for q in order:
        box = None if g.gnd[q].bbx is None else g.gnd[q].bbx
        qsrc = thumb_of("q", q, g.qimlist[q], box)
        aps = []
        for name in names:
            m = pq.get("medium", {}).get(name, [None] * g.num_queries)[q]
            h = pq.get("hard", {}).get(name, [None] * g.num_queries)[q]
            aps.append(f"{html.escape(name)}: M {_fmt(m)} / H {_fmt(h)}")
        parts.append("<div class='q'>")
        parts.append(f"<div class='row'><span class='qimg'>{_img(qsrc, g.qimlist[q])}</span>"
                     f"<span><b>{html.escape(g.qimlist[q])}</b><br>{'<br>'.join(aps)}</span></div>")
        pset, jset = set(pos[q].tolist()), set(junk[q].tolist())
        for name in names:
            row = np.asarray(stages[name][protocol][q])[:TOP]
            cells = []
            for rank, i in enumerate(row.tolist()):
                cls = "pos" if i in pset else "junk" if i in jset else "wrong"
                src = thumb_of("d", i, g.imlist[i])
                cells.append(f"<span class='t {cls}'>{_img(src, g.imlist[i])}{rank + 1}</span>")
            parts.append(f"<div class='row'><span class='lab'>{html.escape(name)}</span>{''.join(cells)}</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    page = out / "report.html"
    _io.write_bytes(page, "\n".join(parts).encode())
    return page


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def _img(src, name: str) -> str:
    alt = html.escape(str(name))
    if src is None:
        return f"<span title='{alt}'>{alt}</span>"
    return f"<img src='{html.escape(src)}' alt='{alt}' title='{alt}'>"


def _summary(result: dict, names) -> str:
    stages = result.get("stages") or {names[-1]: {p: result[p] for p in ("easy", "medium", "hard") if p in result}}
    head = "<tr><th>stage</th>" + "".join(f"<th>{p} mAP</th><th>{p} mP@10</th>" for p in ("easy", "medium", "hard"))
    rows = [f"<table class='sum'>{head}</tr>"]
    for name, m in stages.items():
        cells = "".join(f"<td>{m.get(p, {}).get('mAP', float('nan')):.2f}</td>"
                        f"<td>{m.get(p, {}).get('mP@10', float('nan')):.2f}</td>" for p in ("easy", "medium", "hard"))
        rows.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    t = result.get("timing", {})
    rows.append("</table>")
    rows.append(f"<p>seconds per query: {t.get('seconds_per_query', float('nan'))}</p>")
    return "".join(rows)
