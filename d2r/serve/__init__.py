"""``d2r serve``: a search service over an engine folder, on FastAPI + uvicorn (the ``[serve]`` extra:
``pip install -e ".[serve]"`` in the d2r checkout).

    app = d2r.serve.create_app("my-index")          # a FastAPI app; d2r.serve.run("my-index", port=8000)

JSON API. Every error, the router's own 404/405 included, is ``{"error": "<one line>"}`` with its status; the
service never dies on a bad request:

- ``GET /api/health``: ``{"status": "ok", "images": N}``
- ``GET /api/info``: the engine's :meth:`~d2r.engine.Engine.info`, paths made relative to the engine folder
  (or cut to a file name): no server-side path leaves the server
- ``GET /api/images?offset=0&limit=100&q=TEXT``: indexed ids, sorted, those containing ``q`` (any case) when
  given: ``{"total": N, "offset": o, "ids": [...]}``
- ``POST /api/search`` (multipart): ``file`` (an image) or ``id`` (an indexed image), optional ``box``
  "x1,y1,x2,y2" in pixels of the (upright) query image, ``top_k`` (1–1000, default 10), ``rerank`` (default
  true) → ``{"query": {file|id, width, height, box}, "seconds": s, "hits": [{rank, image_id, score, inliers,
  box, width, height, thumb}]}`` (widths, heights and boxes upright, EXIF orientation applied)
- ``POST /api/images`` (multipart): ``file`` and optional ``id`` (default: the file name without extension)
  → 201 ``{"added": id, "images": N}``; the upload is kept under ``<engine>/uploads/`` (not when refused)
- ``DELETE /api/images/{id}`` → ``{"removed": id, "images": N}``; its upload, if the service stored it, is
  deleted (photos indexed from folders never are)
- ``GET /api/thumb?id=...&size=256``: an upright JPEG thumbnail (size 64, 128, 256 or 512)
- ``GET /api/image?id=...``: the indexed image's file (JPEG, PNG, GIF, WebP, BMP as stored; other formats as a
  JPEG copy)
- ``GET /``: a small web page (upload, or find and pick a photo; draw or type a box; ranked thumbnails)

Limits (each answered in one line, the server keeps serving):

- a request body is counted while it streams: past ``--max-upload-mb`` (default 20) the server stops reading
  and answers 413, with or without ``Content-Length`` (chunked bodies are never spooled whole); at most 32
  bodies in flight (503 beyond);
- an image may have 50 Mpx at most (read from its header, before decoding: 413);
- decoding and describing share a memory budget, ``--memory-mb`` (default 1024), across all requests: each
  request is charged what its decode and extraction need, estimated from its pixels (measured per pixel, see
  :data:`d2r.serve.app.DECODE_BYTES`), waits first come first served (503 after 120 s), and one that can never
  fit is refused (413). Uploads are decoded no larger than the extractor needs: at the size where the box (or
  the whole image) keeps the extractor's working size (``max_side``, 1024 px for RootSIFT), by JPEG DCT scaling
  while decoding, else by an integer reduction right after it; freed memory is given back to the system after
  each decode (glibc ``malloc_trim``). Measured on 2 vCPUs: 16 concurrent 49-Mpx uploads raised the RSS by at
  most 850 MB over its 296 MB base (``benchmarks/results/serve_memory.md``). The estimates are RootSIFT's; DELF
  (TensorFlow) and region detectors on ``POST /api/images`` use more than charged. Queries larger than the
  working size are verified (RANSAC, thresholds in query pixels) at the decoded size, so their inlier counts can
  differ slightly from ``d2r search`` on the full-size file.

Security (for a service on a trusted machine; put it behind an authenticating proxy to share it):

- ``Host`` must name a loopback host, the bound ``--host`` (when bound to every address, also this machine's
  names) or an ``--allow-host`` name (``*``: any): a DNS name rebound to 127.0.0.1 gets 400;
- writes (POST, PUT, PATCH, DELETE, search included) whose ``Origin`` (else ``Referer``) is not the server's own
  origin, or marked ``Sec-Fetch-Site: cross-site``, get 403: other web pages cannot add, remove or search.
  Requests without either header (curl, scripts) are served: they carry no browser's ambient authority;
- every response carries ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``, ``Referrer-Policy:
  same-origin``, ``Cross-Origin-Resource-Policy: same-origin`` and a CSP (the page: its own inline script and
  style by hash, images and requests to the server itself, ``frame-ancestors 'none'``; the API: ``default-src
  'none'``);
- files are served (image, thumbnail, search by id) only from the engine's ``uploads/`` folder and the folders
  holding indexed images (:meth:`~d2r.engine.Engine.image_folders`), checked on the file actually opened (no
  symbolic link followed at the last step, the opened path checked again): a file or folder swapped for a link
  to elsewhere gets 403; only regular files that open as images are served (410 otherwise).

Searches run in parallel threads (the numba kernels, OpenCV and BLAS release the GIL); additions and removals take
the process's single writer lock, which waits for running searches and holds new ones back meanwhile. When another
process commits to the engine (``d2r index add/remove``), the service reopens it before its next request.
"""

from d2r.serve.app import create_app, run

__all__ = ["create_app", "run"]
