"""Drive headless Chromium from a test through the DevTools protocol, with no Python package beyond the stdlib.

Chromium started with --remote-debugging-pipe reads protocol messages (JSON, each ended by a NUL byte) on its file
descriptor 3 and writes replies and events on descriptor 4, so no websocket client and no driver binary is needed.
Used by tests/test_web.py: open a page, evaluate JavaScript, type and press keys, take a screenshot.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-pipe", "--window-size=900,760"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _above_4(fd: int) -> int:
    """The pipe end moved to a descriptor >= 10 (still non-inheritable). A process with few files open (a script,
    not pytest) gets pipes at 3 and 4 themselves, where dup2 onto 3 and 4 would be a no-op that leaves them
    close-on-exec, or would overwrite one end with the other."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Browser:
    def __init__(self, executable: str, flags: tuple = ()):
        """`flags`: more command-line switches, e.g. --host-resolver-rules to take the browser offline."""
        self.profile = tempfile.mkdtemp(prefix="guppy-chromium-")
        to_browser_r, self._to_browser = map(_above_4, os.pipe())
        self._from_browser, from_browser_w = map(_above_4, os.pipe())

        # In the child: its fd 3 reads our commands, its fd 4 carries its replies. Our pipe ends are created
        # non-inheritable, so keeping the fds open (close_fds=False) leaks nothing else into the browser.
        def wire_fds():
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.log = os.path.join(self.profile, "chromium.log")
        with open(self.log, "wb") as log:
            command = [executable, *FLAGS, *flags, f"--user-data-dir={self.profile}", "about:blank"]
            # close_fds=False: else Popen would close fds 3 and 4 after wire_fds
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         preexec_fn=wire_fds, close_fds=False)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf, self._next_id, self.session, self.events = b"", 0, None, []

    # -- protocol ---------------------------------------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.time() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                with open(self.log, errors="replace") as f:
                    raise RuntimeError("Chromium closed the pipe: " + f.read()[-2000:])
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, timeout: float = 60, **params) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    # -- what the tests use -----------------------------------------------------------------------------------------
    def open(self, url: str):
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Runtime.enable")
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def eval(self, expression: str, timeout: float = 60):
        """The value of a JavaScript expression (awaited if it is a promise), or RuntimeError with the exception."""
        r = self.send("Runtime.evaluate", timeout=timeout, expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page: {r['exceptionDetails'].get('exception', {}).get('description', r)}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = self.eval(expression)
            except RuntimeError:  # the page is still navigating (no body yet, context replaced): ask again
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"waited {timeout} s for {expression}; console: {self.console()}")

    def type(self, text: str):
        self.send("Input.insertText", text=text)

    def press_enter(self):
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      text="\r" if kind == "keyDown" else "")

    def screenshot(self, path: str):
        data = self.send("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def console(self) -> list[str]:
        """Console messages and uncaught exceptions seen so far (for failure messages)."""
        out = []
        for e in self.events:
            if e.get("method") == "Runtime.consoleAPICalled":
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append(e["params"]["exceptionDetails"].get("exception", {}).get("description", ""))
        return out

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)
