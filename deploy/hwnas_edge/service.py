"""The gallery search service: FastAPI, bound to 127.0.0.1 by default.

``GET /health`` -> status, index size, dimension, fingerprints.
``POST /search`` with ``{"embeddings": [[...], ...], "fingerprint": "<query model>", "top_k": 5}``
-> ``{"results": [[{"id", "label", "path", "score"}, ...], ...]}``.

The bundle is watched: when its manifest changes (``hwnas-edge add`` grew the index, or
``hwnas deploy --overwrite`` replaced the bundle), the next request loads the new one and
serves it from then on; a bundle caught mid-swap or damaged is not taken (the one loaded
goes on serving, and the next request tries again).

Refusals, each with a message saying what is wrong: a fingerprint that is not the bundle's
query (or gallery) model -> 409; a body over ``max_body_bytes`` or more than ``max_batch``
embeddings -> 413; malformed JSON, a wrong dimension, non-finite values or a bad top_k ->
400/422. Any other failure is a 500 with a message; the service keeps running.
"""

# No `from __future__ import annotations` here: FastAPI must resolve the endpoint
# annotations (Request) at runtime, and they are imported inside create_app.
import errno
import math
import os
import sys
from pathlib import Path

import numpy as np

from hwnas_edge.bundle import Bundle, BundleError


class LiveBundle:
    """The bundle at a path, loaded again when its manifest is replaced (a new file: another
    inode or modification time). ``get()`` costs one ``stat`` while nothing changes."""

    def __init__(self, path: "str | Path"):
        import threading

        self.path = Path(path)
        self.bundle = self._load()
        self.stamp = self.failed = self._stamp()
        self.loading = threading.Lock()  # one reload at a time; the others serve the loaded one

    def _stamp(self):
        st = os.stat(self.path / "manifest.json")
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _load(self) -> Bundle:
        b = Bundle(self.path)
        b.items  # noqa: B018 — reads the index and its rows now: a bad one is never served
        return b

    def get(self) -> Bundle:
        try:
            stamp = self._stamp()
        except OSError:  # mid-swap (the old folder moved aside, the new one not yet in place)
            return self.bundle
        if stamp in (self.stamp, self.failed) or not self.loading.acquire(blocking=False):
            return self.bundle  # unchanged, known bad (tried once per change), or loading now
        try:
            self.bundle, self.stamp = self._load(), stamp
            print(f"hwnas-edge serve: reloaded {self.path}: {self.bundle.index.ntotal} items",
                  file=sys.stderr, flush=True)
        except Exception as e:  # (a damaged manifest can raise more than BundleError)
            self.failed = stamp
            print(f"hwnas-edge serve: the bundle changed but cannot be loaded ({e}); still "
                  f"serving the {self.bundle.index.ntotal}-item index", file=sys.stderr, flush=True)
        finally:
            self.loading.release()
        return self.bundle


def create_app(bundle_path: "str | Path", max_batch: int = 256, max_top_k: int = 100,
               max_body_bytes: int = 8 << 20):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    live = LiveBundle(bundle_path)  # a bad bundle stops the start, rather than a service
    # that answers 500 to every query
    from hwnas_edge import __version__

    app = FastAPI(title="hwnas gallery search", version=__version__)

    def error(status: int, msg: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": msg})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):  # pragma: no cover - exercised via HTTP
        return error(422, f"malformed request: {exc.errors()[:3]}")

    @app.exception_handler(Exception)
    async def _crash(request, exc):  # pragma: no cover - last resort, keeps serving
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    def health():
        bundle = live.get()
        return {"status": "ok", "index_size": int(bundle.index.ntotal), "dim": bundle.dim,
                "factory": bundle.manifest["index"]["factory"],
                "query_fingerprint": bundle.query_fingerprint,
                "gallery_fingerprint": bundle.gallery_fingerprint, "max_batch": max_batch}

    @app.post("/search")
    async def search(request: Request):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            return error(413, f"request body of {length} bytes exceeds the limit of {max_body_bytes}")
        raw = bytearray()  # read up to the limit, not whole: a chunked body names no length
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_body_bytes:
                return error(413, f"request body exceeds the limit of {max_body_bytes} bytes")
        raw = bytes(raw)
        try:
            import json

            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return error(400, "body is not valid JSON; send {\"embeddings\": [[...]], "
                              "\"fingerprint\": \"...\", \"top_k\": 5}")
        if not isinstance(body, dict):
            return error(400, "body must be a JSON object with 'embeddings' and 'fingerprint'")
        bundle = await run_in_threadpool(live.get)  # a reload runs off the event loop
        accepted = {bundle.query_fingerprint, bundle.gallery_fingerprint}
        fp = body.get("fingerprint")
        if not isinstance(fp, str):
            return error(400, "missing 'fingerprint': the query model's fingerprint (from its "
                              "ONNX metadata or the bundle manifest)")
        if fp not in accepted:
            return error(409, f"fingerprint {fp!r} is not compatible with this index (gallery "
                              f"{bundle.gallery_fingerprint}, query {bundle.query_fingerprint})")
        emb = body.get("embeddings")
        if not isinstance(emb, list) or not emb:
            return error(400, "'embeddings' must be a non-empty list of vectors")
        if len(emb) > max_batch:
            return error(413, f"{len(emb)} embeddings exceed the batch limit of {max_batch}")
        top_k = body.get("top_k", 5)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= max_top_k:
            return error(400, f"'top_k' must be an integer from 1 to {max_top_k}")
        if not all(isinstance(v, list) and len(v) == bundle.dim for v in emb):
            return error(422, f"every embedding must be a list of {bundle.dim} numbers")
        # numbers only: numpy would take "0.5" and true as numbers, and nest a list in a list
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for v in emb for x in v):
            return error(422, "embeddings must contain only numbers (no strings, booleans or lists)")
        try:
            arr = np.asarray(emb, dtype=np.float32)
        except OverflowError:  # (an integer beyond any float: not finite either)
            arr = None
        if arr is None or not np.isfinite(arr).all() or any(math.isclose(float(n), 0.0) for n in np.linalg.norm(arr, axis=1)):
            return error(422, "embeddings must be finite and non-zero")
        return {"results": bundle.search(arr, top_k)}

    return app


def check_listen(host: str, port: int) -> None:
    """That the service can listen on ``host``:``port``, tried on each of the host's addresses
    as uvicorn binds them (and let go again): an address in use, or not of this machine, is a
    BundleError naming the fix, said before "serving" (uvicorn would say "serving" first)."""
    import socket

    try:
        addrs = {a[:2] + (a[4],) for a in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                               flags=socket.AI_PASSIVE)}
    except (socket.gaierror, UnicodeError) as e:
        raise BundleError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e}); give an "
                          "address of this machine with --host (127.0.0.1: this machine only; 0.0.0.0: "
                          "every interface)") from None
    absent = []
    for family, kind, addr in addrs:
        sock = socket.socket(family, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn binds)
            sock.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:  # (a family not enabled here, say ::1 of localhost:
                absent.append(e)  # asyncio's server leaves such an address out, as long as one binds)
                continue
            fix = ("another process listens there: give another --port, or stop that one"
                   if e.errno == errno.EADDRINUSE else "give another --host or --port")
            raise BundleError(f"cannot listen on {host}:{port} ({e.strerror or e}); {fix}") from None
        finally:
            sock.close()
    if absent and len(absent) == len(addrs):
        raise BundleError(f"cannot listen on {host}:{port} ({absent[0].strerror or absent[0]}); give an address "
                          "of this machine with --host (127.0.0.1: this machine only; 0.0.0.0: every interface)")


def serve(bundle_path: "str | Path", host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    import uvicorn

    app = create_app(bundle_path, **kw)  # (a bad bundle is refused before "serving" is said)
    check_listen(host, port)  # (and an address it cannot listen on)
    print(f"serving {bundle_path} on http://{host}:{port} (POST /search, GET /health)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
