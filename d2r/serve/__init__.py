"""``d2r serve``: a search service over an engine folder, on FastAPI + uvicorn (the optional ``[serve]`` extra).

    app = d2r.serve.create_app("my-index")          # a FastAPI app; d2r.serve.run("my-index", port=8000)

JSON API (errors are ``{"error": "..."}`` with a 4xx status; the service never dies on a bad request):

- ``GET /api/health``: ``{"status": "ok", "images": N}``
- ``GET /api/info``: the engine's :meth:`~d2r.engine.Engine.info`
- ``GET /api/images?offset=0&limit=100``: indexed ids, ``{"total": N, "ids": [...]}``
- ``POST /api/search`` (multipart): ``file`` (an image) or ``id`` (an indexed image), optional ``box``
  "x1,y1,x2,y2" in pixels of the query image, ``top_k`` (1–1000, default 10), ``rerank`` (default true)
  → ``{"query": {...}, "seconds": s, "hits": [{rank, image_id, score, inliers, box, width, height, thumb}]}``
- ``POST /api/images`` (multipart): ``file`` and optional ``id`` (default: the file name without extension)
  → 201 ``{"added": id}``; the upload is kept under ``<engine>/uploads/``
- ``DELETE /api/images/{id}`` → ``{"removed": id}``
- ``GET /api/thumb?id=...&size=256``: a JPEG thumbnail of an indexed image (size 64, 128, 256 or 512)
- ``GET /api/image?id=...``: the indexed image's file
- ``GET /``: a small web page (upload or pick a photo, draw or type a box, ranked thumbnails)

Searches run in parallel threads (the numba kernels, OpenCV and BLAS release the GIL); additions and removals take
the process's single writer lock, which waits for running searches and holds new ones back meanwhile. When another
process commits to the engine (``d2r index add/remove``), the service reopens it before its next request.
"""

from d2r.serve.app import create_app, run

__all__ = ["create_app", "run"]
