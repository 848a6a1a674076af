"""`guppy serve DIR [--port N]`: serve an export folder on 127.0.0.1, so that a browser can open its chat page.

Browsers refuse to load WASM (and fetch JSON) from file:// pages, so the page needs a web server, and this is the
smallest one: the standard library's, with the right MIME types for .mjs and .wasm (WebAssembly streaming
compilation requires application/wasm), no caching (a re-export shows at once), and one log line per error only.
Bound to 127.0.0.1: the model and page are for this machine's browser; put the folder on any static host to share it.
"""
from __future__ import annotations

import functools
import http.server
import os
import sys

from guppy.errors import GuppyError


class Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript",
                      ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
                      ".onnx": "application/octet-stream"}

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format, *args):
        pass

    def log_error(self, format, *args):
        sys.stderr.write(f"guppy serve: {format % args}\n")


def make_server(folder: str, port: int = 8000, host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    """A server for `folder` (not started). port 0 picks a free port (server.server_address[1])."""
    if not os.path.isdir(folder):
        raise GuppyError(f"{folder}: no such folder (make one with `guppy export --checkpoint RUN --out {folder}`)")
    if not os.path.isfile(os.path.join(folder, "index.html")) or not os.path.isfile(os.path.join(folder,
                                                                                                 "model.onnx")):
        raise GuppyError(f"{folder}: not an export folder (no index.html and model.onnx; see `guppy export`)")
    handler = functools.partial(Handler, directory=os.path.abspath(folder))
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise GuppyError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None


def serve(folder: str, port: int = 8000, log=print):
    server = make_server(folder, port)
    host, port = server.server_address[:2]
    log(f"serving {folder} at http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("")
    finally:
        server.server_close()
