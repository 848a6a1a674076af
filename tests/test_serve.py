"""`guppy serve`'s rules (guppy/serve.py's docstring): what it exposes, and to whom.

Each security rule has its own test, against a real server on a free port in a thread, asked with http.client or a
raw socket so that the Host header and the path are exactly what a hostile client would send. No model is needed:
make_server only checks that the folder holds an index.html and a model.onnx.
"""
import contextlib
import http.client
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from guppy.errors import GuppyError
from guppy.serve import make_server

PAGE = b"<!doctype html><title>guppy</title>"
SECRET = b"root:x:0:0:the secret outside the folder"


@pytest.fixture
def folder(tmp_path):
    """A fake export folder, with a secret file next to it (outside it)."""
    d = tmp_path / "export"
    d.mkdir()
    (d / "index.html").write_bytes(PAGE)
    (d / "model.onnx").write_bytes(b"\x08\x07onnx-bytes")
    (d / "chat.mjs").write_text("export const x = 1;\n")
    (d / "tokenizer.js").write_text("var y = 2;\n")
    (d / "ort-wasm.wasm").write_bytes(b"\x00asm\x01\x00\x00\x00")
    (d / "persona.json").write_text('{"name": "guppy"}')
    (tmp_path / "secret.txt").write_bytes(SECRET)
    return d


@contextlib.contextmanager
def running(folder, host="127.0.0.1"):
    server = make_server(str(folder), 0, host)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def server(folder):
    with running(folder) as s:
        yield s


SAME = object()  # the Host header a browser sends for http://127.0.0.1:PORT/


def request(server, path, host=SAME, method="GET", connect="127.0.0.1"):
    """(status, headers, body) of one request; host=None sends no Host header, a list sends each of them."""
    port = server.server_address[1]
    conn = http.client.HTTPConnection(connect, port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for value in ([f"127.0.0.1:{port}"] if host is SAME else [] if host is None else
                      host if isinstance(host, list) else [host]):
            conn.putheader("Host", value)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def stderr_after(capfd, want_lines=1, timeout=10.0) -> str:
    """What the server wrote on stderr, waiting (for a request the client gave up on) until it has said something."""
    err, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline and len(err.splitlines()) < want_lines:
        err += capfd.readouterr().err
        time.sleep(0.05)
    time.sleep(0.2)  # a traceback comes in several writes: let it finish
    return err + capfd.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# what may be served

def test_the_page_and_its_files_are_served(server):
    status, _, body = request(server, "/")
    assert status == 200 and body == PAGE
    assert request(server, "/index.html")[2] == PAGE
    assert request(server, "/model.onnx")[2] == b"\x08\x07onnx-bytes"
    assert request(server, "/model.onnx?v=2")[0] == 200


def test_symlink_out_of_the_folder_is_not_served(server, folder, tmp_path):
    os.symlink("/etc", folder / "etclink")
    os.symlink(tmp_path / "secret.txt", folder / "secret.txt")
    os.symlink(tmp_path, folder / "up")
    for path in ("/etclink/passwd", "/etclink/", "/etclink", "/secret.txt", "/up/secret.txt"):
        status, _, body = request(server, path)
        assert status == 404, path
        assert SECRET not in body and b"root:" not in body
    # a symlink that stays inside the folder is fine
    os.symlink("model.onnx", folder / "latest.onnx")
    assert request(server, "/latest.onnx")[:3:2] == (200, b"\x08\x07onnx-bytes")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_in_the_folder_is_not_served_and_does_not_hang(server, folder):
    os.mkfifo(folder / "pipe")  # opening it to read would wait for a writer forever
    assert request(server, "/pipe")[0] == 404
    assert request(server, "/")[0] == 200


def test_dotfiles_are_not_served(server, folder, tmp_path):
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("[remote] url = https://token@example.com/x.git")
    (folder / ".env").write_text("TOKEN=1")
    (folder / "ort").mkdir()
    (folder / "ort" / ".hidden").write_text("x")
    os.symlink(".git/config", folder / "config.txt")  # inside the folder, but to a dotfile
    for path in ("/.git/config", "/.git/", "/.git", "/%2egit/config", "/.env", "/ort/.hidden", "/config.txt",
                 "/../secret.txt", "/%2e%2e/secret.txt", "/ort/../.env"):
        status, _, body = request(server, path)
        assert status == 404, path
        assert b"token" not in body.lower() and SECRET not in body


def test_no_directory_listing(server, folder):
    (folder / "ort").mkdir()
    (folder / "ort" / "ort-wasm-simd.wasm").write_bytes(b"\x00asm")
    for path in ("/ort/", "/ort"):
        status, _, body = request(server, path)
        assert status == 404, path
        assert b"ort-wasm-simd" not in body
    (folder / "docs").mkdir()
    (folder / "docs" / "index.html").write_bytes(b"docs page")
    assert request(server, "/docs/")[:3:2] == (200, b"docs page")
    status, headers, _ = request(server, "/docs")  # the page's relative URLs need the trailing "/"
    assert status == 301 and headers["Location"] == "/docs/"


def test_mime_types_no_cache_and_no_cors(server):
    want = {"/chat.mjs": "text/javascript", "/tokenizer.js": "text/javascript", "/ort-wasm.wasm": "application/wasm",
            "/persona.json": "application/json", "/model.onnx": "application/octet-stream", "/": "text/html"}
    for path, mime in want.items():
        status, headers, _ = request(server, path)
        assert status == 200 and headers["Content-Type"].split(";")[0] == mime, (path, headers["Content-Type"])
        assert headers["Cache-Control"] == "no-store"
        assert not any(k.lower().startswith("access-control-") for k in headers), dict(headers)
    status, headers, body = request(server, "/model.onnx", method="HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == str(len(b"\x08\x07onnx-bytes"))


# ---------------------------------------------------------------------------------------------------------------
# to whom

def test_loopback_host_values_are_accepted(server):
    port = server.server_address[1]
    for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LocalHost:{port}", "[::1]", f"[::1]:{port}"):
        status, _, body = request(server, "/", host=host)
        assert status == 200 and body == PAGE, host


def test_foreign_host_header_is_refused(server):
    port = server.server_address[1]
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.2", "[::2]", "localhost:http", "::1",
                 "127.0.0.1:", [f"127.0.0.1:{port}", "attacker.example"]):
        status, headers, body = request(server, "/", host=host)
        assert status in (403, 421), host
        assert PAGE not in body and 0 < len(body) < 200 and headers["Content-Type"].startswith("text/plain"), body
    assert request(server, "/model.onnx", host="attacker.example")[0] in (403, 421)


def test_dns_rebinding_name_that_resolves_to_loopback_is_refused(server):
    # A page from http://rebind.attacker.example:PORT/ re-points its name at 127.0.0.1, then fetches the folder as
    # same-origin: the connection is to loopback, and only the Host header says whose page is asking.
    port = server.server_address[1]
    for host in (f"rebind.attacker.example:{port}", f"127.0.0.1.nip.io:{port}", f"localhost.attacker.example:{port}"):
        for path in ("/", "/model.onnx", "/persona.json"):
            status, _, body = request(server, path, host=host)
            assert status in (403, 421) and PAGE not in body and b"onnx-bytes" not in body, (host, path)


def test_missing_host_header_on_http_1_1_is_refused(server):
    status, _, body = request(server, "/", host=None)
    assert status in (403, 421) and PAGE not in body


def test_host_option_widens_the_allowed_hosts(folder):
    try:
        ctx = running(folder, host="127.0.0.2")  # loopback too on Linux, but not a name serve allows by default
        server = ctx.__enter__()
    except GuppyError as e:
        pytest.skip(f"cannot listen on 127.0.0.2 here: {e}")
    try:
        port = server.server_address[1]
        for host in (f"127.0.0.2:{port}", "127.0.0.2", "localhost"):
            assert request(server, "/", host=host, connect="127.0.0.2")[0] == 200, host
        assert request(server, "/", host="attacker.example", connect="127.0.0.2")[0] in (403, 421)
    finally:
        ctx.__exit__(None, None, None)


def test_host_0_0_0_0_accepts_any_host(folder):
    with running(folder, host="0.0.0.0") as server:
        assert request(server, "/", host="attacker.example")[:3:2] == (200, PAGE)


# ---------------------------------------------------------------------------------------------------------------
# hostile or impatient clients: one log line, never a traceback

@pytest.mark.parametrize("path, code", [
    ("/%00", 400), ("/index.html%00.js", 400), ("/%zz", 400), ("/%", 400), ("/%ff", 400), ("/%C0%AE%C0%AE/", 400),
    ("/" + "a" * 5000, 414),
])
def test_malformed_paths_are_4xx_without_traceback(server, capfd, path, code):
    capfd.readouterr()
    status, _, body = request(server, path)
    err = stderr_after(capfd)
    assert status == code and len(body) < 200
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert request(server, "/")[0] == 200


def test_aborted_download_is_one_line_without_traceback(folder, capfd):
    with open(folder / "big.onnx", "wb") as f:
        f.truncate(64 << 20)  # sparse: more than the socket buffers hold, so the server is mid-send at the reset
    with running(folder) as server:
        capfd.readouterr()
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", server.server_address[1]))
        s.sendall(b"GET /big.onnx HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.0 200")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset, like a tab
        s.close()
        err = stderr_after(capfd)
        assert "Traceback" not in err and len(err.splitlines()) <= 1, err
        assert request(server, "/")[0] == 200


def test_a_silent_connection_is_closed_after_the_timeout(folder, capfd, monkeypatch):
    """A client that connects and sends nothing held its thread forever; now the server closes it after
    REQUEST_TIMEOUT_S (shortened here), says so in one line, and goes on serving."""
    from guppy import serve
    assert serve.Handler.timeout is not None and 0 < serve.Handler.timeout <= 60  # the stock handler's is None
    monkeypatch.setattr(serve.Handler, "timeout", 0.5)
    with running(folder) as server:
        capfd.readouterr()
        s = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)
        start = time.monotonic()
        s.sendall(b"GET /index.html HTTP/1.1\r\n")  # half a request, then silence
        assert s.recv(4096) == b""  # closed by the server, not by the client's own 10 s timeout
        assert time.monotonic() - start < 5
        s.close()
        err = stderr_after(capfd)
        assert "timed out" in err and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert request(server, "/")[0] == 200


# ---------------------------------------------------------------------------------------------------------------
# which folder

def test_a_path_to_the_exports_model_onnx_serves_its_folder(folder):
    for name in ("model.onnx", "index.html"):
        with running(folder / name) as server:
            assert request(server, "/")[:3:2] == (200, PAGE)
    with pytest.raises(GuppyError, match="not an export folder"):
        make_server(str(folder / "persona.json"), 0)


def guppy(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "guppy", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_cli_serve_of_a_file_that_is_not_an_export_is_one_line(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    out, err = guppy("serve", str(notes)).communicate(timeout=300)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("guppy serve: error: ") and "not an export folder" in lines[0], lines
    assert "no such folder" not in lines[0]


def test_cli_host_0_0_0_0_warns_in_one_line(folder):
    proc = guppy("serve", str(folder), "--port", "0", "--host", "0.0.0.0")
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "warning" in lines[0] and "everyone on the network" in lines[0], err
