"""``hwnas-edge``: query a bundle from an edge device, serve its gallery index, verify it.

    hwnas-edge query BUNDLE image.jpg [more.jpg ...] --top-k 5
    hwnas-edge query BUNDLE photos/ --json                  # every image under a folder
    hwnas-edge query BUNDLE image.jpg --server http://127.0.0.1:8000
    hwnas-edge serve BUNDLE --port 8000
    hwnas-edge verify BUNDLE
    hwnas-edge add BUNDLE new_photos/ more.csv --label shoes   # grow the gallery index
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

from hwnas_edge.bundle import Bundle, BundleError, reader_gone, stdout_gone, verify


QUERY_BATCH = 256  # images decoded and embedded at a time by `query` (a folder is not held whole)


def _query_images(given: list[str]) -> list[str]:
    """The images a query names: files as given, a folder as every image under it (sorted)."""
    from pathlib import Path

    from hwnas_edge.preprocess import IMAGE_EXTS
    from hwnas_edge.sources import folder_images

    out = []
    for a in given:
        if Path(a).is_dir():
            found = folder_images(a)
            if not found:
                raise BundleError(f"folder {a} holds no image file ({', '.join(sorted(IMAGE_EXTS))})")
            out += [str(p) for p in found]
        else:
            out.append(a)
    return out


def _check_server_url(server: str) -> None:
    example = "e.g. http://127.0.0.1:8000"
    if not server.startswith(("http://", "https://")):
        raise BundleError(f"--server {server!r} must be an http:// or https:// URL, {example}")
    try:
        u = urllib.parse.urlsplit(server)
        u.port  # noqa: B018 — raises ValueError on a port that is not a number in range
    except ValueError as e:
        raise BundleError(f"--server {server!r} is not a valid URL ({e}), {example}") from None
    if not u.hostname:
        raise BundleError(f"--server {server!r} names no host, {example}")


def _remote_search(server: str, emb, fingerprint: str, k: int, timeout: float = 30.0) -> list:
    _check_server_url(server)
    body = json.dumps({"embeddings": emb.tolist(), "fingerprint": fingerprint, "top_k": k}).encode()
    req = urllib.request.Request(server.rstrip("/") + "/search", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        if e.code == 413 and len(emb) > 1:  # over the service's --max-batch or body limit: in halves
            half = (len(emb) + 1) // 2
            return (_remote_search(server, emb[:half], fingerprint, k, timeout)
                    + _remote_search(server, emb[half:], fingerprint, k, timeout))
        msg = e.read().decode(errors="replace")
        hint = (f"; --server takes the service's base URL (hwnas-edge adds /search), e.g. "
                f"{server.rstrip('/').rsplit('/', 1)[0]}" if e.code == 404 and urllib.parse.urlsplit(server).path.strip("/")
                else "")
        raise BundleError(f"gallery service refused the query ({e.code}): {msg}{hint}") from None
    except urllib.error.URLError as e:
        raise BundleError(f"cannot reach the gallery service at {server}: {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:  # a timeout, a dropped connection
        what = f"gave no answer within {timeout:g} s" if isinstance(e, TimeoutError) else \
            f"broke off the exchange ({type(e).__name__}: {e})"
        raise BundleError(f"the gallery service at {server} {what}; check that `hwnas-edge serve` "
                          "runs there and try again") from None
    try:
        results = json.loads(raw)["results"]
        if not isinstance(results, list):
            raise TypeError
        return results
    except (ValueError, KeyError, TypeError):  # no JSON, or no "results" list in it
        raise BundleError(f"{server} answered, but not as an hwnas gallery service (no JSON "
                          "'results'); check the address and that `hwnas-edge serve` runs there") from None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, not {text!r}")
    return n


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1-65535, not {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hwnas-edge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("query", help="embed images with query.onnx and search the gallery")
    q.add_argument("bundle")
    q.add_argument("images", nargs="+", help="image files, or folders (every image under one)")
    q.add_argument("--top-k", type=_positive_int, default=5, help="hits per image (default 5)")
    q.add_argument("--server", help="search a remote gallery service instead of the local index "
                   "(the device then needs only manifest.json and query*.onnx)")
    q.add_argument("--int8", action="store_true", help="use the int8 query model")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.add_argument("--threads", type=_positive_int, default=None,
                   help="ONNX Runtime intra-op threads for the query model (default: the thread "
                        "count it was measured at when deployed, from the manifest)")
    s = sub.add_parser("serve", help="serve the bundle's gallery index over HTTP")
    s.add_argument("bundle")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    s.add_argument("--max-batch", type=_positive_int, default=256,
                   help="most query embeddings one request may search (default 256)")
    v = sub.add_parser("verify", help="check artifact hashes and ONNX parity")
    v.add_argument("bundle")
    a = sub.add_parser("add", help="embed new gallery images with gallery.onnx and add them to the index "
                       "(a running serve picks them up at its next request)")
    a.add_argument("bundle")
    a.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="image files, folders (any depth), .zip files or CSV manifests (path and optional "
                        "label columns)")
    a.add_argument("--label", help="the label of the added images a manifest does not label")
    a.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable images out (counted) instead of stopping")
    a.add_argument("--skip-existing", action="store_true",
                   help="leave out images whose ids the index holds (e.g. a catalog folder added "
                   "again after new photos arrived) instead of stopping")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "query":
            if args.server:
                _check_server_url(args.server)  # before any image is read
            b = Bundle(args.bundle, query_only=bool(args.server))
            images, res = _query_images(args.images), []
            for i in range(0, len(images), QUERY_BATCH):
                emb = b.embed(b.load_images(images[i:i + QUERY_BATCH]), int8=args.int8, threads=args.threads)
                res += (_remote_search(args.server, emb, b.query_fingerprint, args.top_k) if args.server
                        else b.search(emb, args.top_k))
            if args.json:
                print(json.dumps({"results": [{"image": i, "top": r} for i, r in zip(images, res)]}))
            else:
                for img, r in zip(images, res):
                    print(img)
                    for rank, hit in enumerate(r, 1):
                        print(f"  {rank}. {hit['score']:.4f}  " + (f"{hit['label']}  " if hit["label"] is not None else "")
                              + hit["id"])
        elif args.command == "serve":
            from hwnas_edge.service import serve

            serve(args.bundle, args.host, args.port, max_batch=args.max_batch)
        elif args.command == "add":
            from hwnas_edge.add import add_images

            add_images(args.bundle, args.sources, label=args.label, skip_bad=args.skip_bad_images,
                       skip_existing=args.skip_existing)
        else:
            print(json.dumps(verify(args.bundle), indent=2))
    except BundleError as e:
        print(f"hwnas-edge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # (add writes through a staging copy: the bundle is as it was)
        print(f"hwnas-edge {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not stdout_gone():
            raise
        return reader_gone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
