"""`guppy serve DIR [--port N] [--host HOST]`: serve an export folder to this machine's browser, so that it can open
the chat page.

Browsers refuse to load WASM (and fetch JSON) from file:// pages, so the page needs a web server, and this is the
smallest one: the standard library's, with the right MIME types for .mjs and .wasm (WebAssembly streaming
compilation requires application/wasm), no caching (a re-export shows at once), no CORS headers, and one log line per
error only (a malformed request or a cancelled download is a line, never a traceback).

What it exposes, and to whom (the rules; tests/test_serve.py holds one test per rule):
- to this machine only: bound to 127.0.0.1, and it answers only requests whose Host header is 127.0.0.1, localhost or
  [::1] (any port). Anything else, or none on HTTP/1.1, gets 421: a web page can rebind its own name to 127.0.0.1
  (DNS rebinding) and then read the folder from the user's browser, and the Host header is what gives it away.
- `--host HOST` binds there instead, on purpose: a specific address or name is then also accepted as Host; 0.0.0.0
  or :: accepts any Host, and serve prints a warning that everyone on the network can read the folder.
- only regular files whose real path (symlinks resolved) is inside the folder's real path, and none whose path has a
  component starting with "." (.git, .env): a symlink out of the folder, a FIFO or a device is 404, as if absent.
- no directory listings: a folder request serves that folder's index.html (`/` serves the page), or is 404.
- a connection that sends or takes nothing for REQUEST_TIMEOUT_S is closed, with one log line.
To share the page, put the folder on any static host instead.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import http.server
import os
import re
import socket
import stat
import sys
import urllib.parse

from guppy.errors import GuppyError

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
MAX_PATH = 2048  # no file of an export has a path near this; longer is a malformed or hostile request
# seconds a connection may go without sending or taking a byte; a client that opens one and says nothing (or stops
# reading mid-file) would otherwise hold a thread forever. Per socket operation, so a big file still downloads.
REQUEST_TIMEOUT_S = 30.0
# a client that goes away mid-response: a cancelled download, a closed tab, a reload
GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _printable(text: str, limit: int = 200) -> str:
    """`text` fit for one log line: control characters escaped (a request line is the client's), long text cut."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "..."


def host_key(host: str) -> str:
    """How a host appears in a Host header, lowercased: an IPv6 address in brackets, anything else as it is."""
    host = host.strip().lower()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def host_of(value: str) -> str | None:
    """The host part of a Host header's value (port dropped, lowercased), or None when it is malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        host, rest = (value[:end + 1], value[end + 1:]) if end > 0 else ("", "")
    else:
        host, _, port = value.partition(":")
        rest = f":{port}" if _ else ""
    if not host or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
        return None
    return host


class Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript",
                      ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
                      ".onnx": "application/octet-stream"}
    # errors in plain text: short, and nothing of the request is echoed into an HTML page
    error_message_format = "%(code)d %(message)s: %(explain)s\n"
    error_content_type = "text/plain; charset=utf-8"
    timeout = REQUEST_TIMEOUT_S  # socketserver sets it on the connection; a silent client gets one log line

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format, *args):
        pass

    def log_error(self, format, *args):
        request = getattr(self, "requestline", "")
        where = f"{_printable(request)}: " if request else ""
        sys.stderr.write(f"guppy serve: {where}{_printable(format % args, 400)}\n")

    # -- who may ask ---------------------------------------------------------------------------------------------

    def parse_request(self):
        if not super().parse_request():
            return False
        allowed = self.server.allowed_hosts
        values = self.headers.get_all("Host") or []
        if allowed is None or (not values and self.request_version < "HTTP/1.1"):
            return True  # --host 0.0.0.0 on purpose; or HTTP/1.0 without Host, which no browser sends
        host = host_of(values[0]) if len(values) == 1 else None
        if host not in allowed:
            self.send_error(421, "Misdirected Request", "this server answers only for " + ", ".join(sorted(allowed)))
            return False
        return True

    # -- what may be served ----------------------------------------------------------------------------------------

    def send_head(self):
        """The response's headers, and the open file to copy for GET (None when an error was sent)."""
        path = urllib.parse.urlsplit(self.path).path
        if len(path) > MAX_PATH:
            self.send_error(414)
            return None
        try:
            if not path.startswith("/") or _BAD_PERCENT.search(path):
                raise ValueError
            name = urllib.parse.unquote(path, errors="strict")
        except (ValueError, UnicodeDecodeError):
            self.send_error(400, "Bad request path")
            return None
        if "\x00" in name or "\\" in name:
            self.send_error(400, "Bad request path")
            return None
        parts = [p for p in name.split("/") if p]
        # a dotfile (.git/config, .env), and ".." too: nothing of the folder's own whose name starts with "."
        if any(p.startswith(".") for p in parts):
            self.send_error(404)
            return None
        real = self._inside(os.path.join(self.directory, *parts))
        if real is not None and os.path.isdir(real):
            index = self._inside(os.path.join(real, "index.html"))
            if index is None or not os.path.isfile(index):
                self.send_error(404)  # no listing: it would show what the folder holds beyond the page
                return None
            if not path.endswith("/"):  # the page's relative URLs need the folder's URL to end in "/"
                self.send_response(301)
                self.send_header("Location", path + "/")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            real, parts = index, [*parts, "index.html"]
        elif path.endswith("/"):
            real = None
        f = self._open_regular(real) if real is not None else None
        if f is None:
            self.send_error(404)
            return None
        fs = os.fstat(f.fileno())
        self.send_response(200)
        self.send_header("Content-Type", self.guess_type(parts[-1] if parts else "index.html"))
        self.send_header("Content-Length", str(fs.st_size))
        self.send_header("Last-Modified", self.date_time_string(fs.st_mtime))
        self.end_headers()
        return f

    def _inside(self, path: str) -> str | None:
        """`path`'s real path if it is inside the folder's real path, with no "." component there, else None."""
        root = self.directory  # make_server gives the folder's real path
        try:
            real = os.path.realpath(path)
            if os.path.commonpath([real, root]) != root:
                return None  # a symlink out of the folder: DIR/etc -> /etc would serve /etc/passwd
        except (OSError, ValueError):
            return None
        rel = os.path.relpath(real, root)
        if rel != "." and any(p.startswith(".") for p in rel.split(os.sep)):
            return None  # a symlink inside the folder to its own dotfile
        return real

    @staticmethod
    def _open_regular(real: str):
        """`real` opened for reading if it is a regular file, else None. O_NONBLOCK: opening a FIFO would otherwise
        wait for a writer, holding the request forever; fstat checks the file opened, not the name looked up."""
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(real, flags)
        except (OSError, ValueError):
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                return None
            if hasattr(os, "set_blocking"):
                os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except OSError:
            os.close(fd)
            return None

    def list_directory(self, path):
        self.send_error(404)  # never a listing; send_head does not call this, and nothing else should
        return None

    # -- clients that go away ----------------------------------------------------------------------------------------

    def copyfile(self, source, outputfile):
        try:
            super().copyfile(source, outputfile)
        except GONE:
            self.close_connection = True
            self.log_error("the client closed the connection before the end of the file")

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except GONE:  # while reading the request or writing the headers: nothing to answer, no one to tell
            self.close_connection = True


class Server(http.server.ThreadingHTTPServer):
    """The HTTP server, on an IPv4 or IPv6 address, with the Host values it answers (None: any)."""

    def __init__(self, address, handler, family, allowed_hosts):
        self.address_family = family
        self.allowed_hosts = allowed_hosts
        super().__init__(address, handler)

    def server_bind(self):
        if self.address_family == socket.AF_INET6 and self.server_address[0] in WILDCARD_HOSTS:
            with contextlib.suppress(OSError, AttributeError):  # "::" also takes IPv4, as 0.0.0.0 would
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def handle_error(self, request, client_address):
        e = sys.exc_info()[1]
        if isinstance(e, OSError):  # the network's doing (a reset, a timeout): one line, the server goes on
            sys.stderr.write(f"guppy serve: {client_address[0]}: {_printable(str(e))}\n")
        else:  # anything else is a bug in this module: its traceback, so that it gets reported
            super().handle_error(request, client_address)


def export_folder(path: str) -> str:
    """The export folder `path` names: the folder, or its model.onnx or index.html."""
    if os.path.isfile(path) and os.path.basename(path) in ("model.onnx", "index.html"):
        return os.path.dirname(path) or "."
    if os.path.exists(path) and not os.path.isdir(path):
        raise GuppyError(f"{path}: not an export folder (a file; give the folder `guppy export` wrote, or its "
                         f"model.onnx)")
    return path


def make_server(folder: str, port: int = 8000, host: str = "127.0.0.1") -> Server:
    """A server for `folder` (or its model.onnx / index.html; not started). port 0 picks a free port
    (server.server_address[1]). host: the address to listen on; see the module's docstring for what it opens."""
    folder = export_folder(folder)
    if not os.path.isdir(folder):
        raise GuppyError(f"{folder}: no such folder (make one with `guppy export --checkpoint RUN --out {folder}`)")
    if not os.path.isfile(os.path.join(folder, "index.html")) or not os.path.isfile(os.path.join(folder,
                                                                                                 "model.onnx")):
        raise GuppyError(f"{folder}: not an export folder (no index.html and model.onnx; see `guppy export`)")
    host = host.strip()
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        family = socket.getaddrinfo(bare or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    except (OSError, UnicodeError) as e:
        raise GuppyError(f"--host {host}: not an address or name this machine can listen on ({e})") from None
    handler = functools.partial(Handler, directory=os.path.realpath(folder))
    try:
        server = Server((bare, port), handler, family, allowed_hosts=None)
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            raise GuppyError(f"--host {host}: not an address of this machine ({e.strerror or e})") from None
        raise GuppyError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None
    if bare not in WILDCARD_HOSTS:  # the address (and name) asked for, on purpose; the loopback names always
        server.allowed_hosts = LOOPBACK_HOSTS | {host_key(bare), host_key(server.server_address[0])}
    return server


def serve(folder: str, port: int = 8000, host: str = "127.0.0.1", log=print):
    folder = export_folder(folder)
    server = make_server(folder, port, host)
    bound, port = server.server_address[:2]
    if server.allowed_hosts is None:
        print(f"guppy serve: warning: --host {host} listens on every network interface and answers any Host: "
              f"everyone on the network can read {folder}", file=sys.stderr, flush=True)
        bound = "127.0.0.1"  # the URL for this machine's browser
    log(f"serving {folder} at http://{host_key(bound)}:{port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("")
    finally:
        server.server_close()
