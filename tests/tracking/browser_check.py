"""Render a URL in headless Debian Chromium: the DOM after the page's scripts ran, its visible text, the
runs-table column ids, and a PNG screenshot of the same moment.

Used by the slow browser tests (``from browser_check import render, find_chromium``) and by hand:
``python tests/browser_check.py URL [OUT_DIR]`` prints the title, the visible text, the column ids and the
screenshot's path.

One load per call, in a new, empty Chromium profile (no ``localStorage`` from an earlier visit changes what
the page shows) that is deleted afterwards. The page is driven over the DevTools protocol on
``--remote-debugging-pipe`` (standard library only, no network port, no Selenium): navigate, wait in real
time until every ``expect`` string is in the page's text, wait until the DOM stops changing (charts and
grids render in steps), then read the DOM and take the screenshot. A page that never shows ``expect`` is
still returned (the caller's assertions say what is missing) after ``timeout_s``.

Chromium is ``$CRDND_CHROMIUM``, else ``chromium`` or ``chromium-browser`` on PATH (Debian's package is
``chromium``: ``apt-get install chromium``). :func:`find_chromium` returns None without it, and
:func:`require_chromium` skips the calling test with the reason :data:`MISSING`.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar, Sequence

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-crash-reporter", "--hide-scrollbars", "--mute-audio",
    "--no-default-browser-check", "--remote-debugging-pipe",
)
"""Flags of every load: headless, no sandbox (root in containers), nothing fetched from the internet."""

MISSING = ("Debian's chromium is not installed (apt-get install chromium), or set CRDND_CHROMIUM to a "
           "Chromium binary; the browser check needs it.")


def find_chromium() -> str | None:
    """The Chromium binary: ``$CRDND_CHROMIUM``, else ``chromium`` or ``chromium-browser`` on PATH."""
    configured = os.environ.get("CRDND_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() and os.access(configured, os.X_OK) else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    """The Chromium binary, or skip the calling pytest test with the reason :data:`MISSING`."""
    found = find_chromium()
    if found is None:
        import pytest

        pytest.skip(MISSING)
    return found


class _Headers(HTMLParser):
    """The ``col-id`` of each column header (ag-grid: ``role="columnheader"``), in document order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.headers: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("role") == "columnheader" and found.get("col-id"):
            self.headers.append(str(found["col-id"]))


@dataclass
class Rendered:
    """What a headless load of ``url`` produced."""

    url: str
    title: str
    dom: str
    """The serialised DOM (``document.documentElement.outerHTML``) when the page had settled."""
    text: str
    """The page's visible text (``document.body.innerText``), whitespace collapsed."""
    column_headers: list[str]
    """The ``col-id`` of each table column header, e.g. ``metrics.`best_pgd20_acc```."""
    screenshot: Path | None
    seconds: float
    complete: bool
    """Whether every ``expect`` string appeared before the timeout."""


class _DevTools:
    """A Chromium process driven over ``--remote-debugging-pipe`` (fd 3: commands in, fd 4: replies out)."""

    _PREFIX: ClassVar[str] = "crdnd-chromium-"

    def __init__(self, binary: str, window: tuple[int, int], extra: Sequence[str]) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix=self._PREFIX))
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # Chromium insists on fds 3 and 4; move both ends out of the way first so the dup2 calls cannot clash.
        high_in = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        high_out = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)

        def child_fds() -> None:
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", f"--window-size={window[0]},{window[1]}",
                 *extra, "about:blank"]
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([binary, *flags], stdin=subprocess.DEVNULL, stdout=self.log,
                                        stderr=subprocess.STDOUT, preexec_fn=child_fds, close_fds=False,
                                        start_new_session=True)
        os.close(high_in)
        os.close(high_out)
        self.writer = to_chrome_w
        self.reader = from_chrome_r
        self.buffer = b""
        self.next_id = 0
        self.session: str | None = None

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time.")
            ready, _, _ = select.select([self.reader], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.reader, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the DevTools pipe.\n{self.output()}")
                self.buffer += chunk
            elif self.process.poll() is not None:
                raise RuntimeError(f"Chromium exited ({self.process.returncode}).\n{self.output()}")
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict[str, Any] | None = None, timeout_s: float = 30.0,
             session: bool = True) -> dict[str, Any]:
        self.next_id += 1
        request: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            request["sessionId"] = self.session
        os.write(self.writer, json.dumps(request).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method} failed: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result.get("result", {}).get("value")

    def attach(self, window: tuple[int, int]) -> None:
        targets = self.call("Target.getTargets", session=False)["targetInfos"]
        page = next((t for t in targets if t.get("type") == "page"), None)
        target = page["targetId"] if page else self.call("Target.createTarget", {"url": "about:blank"},
                                                         session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 session=False)["sessionId"]
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": window[0], "height": window[1], "deviceScaleFactor": 1, "mobile": False})

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                try:
                    self.call("Browser.close", session=False, timeout_s=5)
                except (RuntimeError, TimeoutError, OSError):
                    pass
                try:
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        finally:
            for fd in (self.writer, self.reader):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.log.close()
            shutil.rmtree(self.profile, ignore_errors=True)


def render(url: str, out_dir: Path | str | None = None, name: str = "page", *, expect: Sequence[str] = (),
           window: tuple[int, int] = (1920, 1080), screenshot: bool = True, timeout_s: float = 60.0,
           settle_s: float = 1.5, extra_flags: Sequence[str] = (), chromium: str | None = None) -> Rendered:
    """Load ``url`` headless and return its DOM, text, column headers and (``screenshot``) the PNG
    ``<out_dir>/<name>.png`` (a temporary folder when ``out_dir`` is None).

    Waits up to ``timeout_s`` for every ``expect`` string to be in the text, then until the DOM has not
    changed for ``settle_s`` seconds (at most ``timeout_s`` more). Raises RuntimeError when Chromium is
    missing, does not start or crashes.
    """
    binary = chromium or find_chromium()
    if binary is None:
        raise RuntimeError(MISSING)
    started = time.monotonic()
    browser = _DevTools(binary, window, extra_flags)
    try:
        try:
            browser.attach(window)
            browser.call("Page.navigate", {"url": url})
        except TimeoutError as error:
            raise RuntimeError(f"Chromium did not start or load {url}.\n{browser.output()}") from error
        text_js = "document.body ? document.body.innerText : ''"
        deadline = time.monotonic() + timeout_s
        text = ""
        while time.monotonic() < deadline:
            text = browser.evaluate(text_js) or ""
            if text and all(item in text for item in expect):
                break
            time.sleep(0.25)
        complete = bool(text) and all(item in text for item in expect)
        size_js = "document.documentElement ? document.documentElement.outerHTML.length : 0"
        last, stable_since, settle_deadline = -1, time.monotonic(), time.monotonic() + timeout_s
        while time.monotonic() < settle_deadline:
            size = browser.evaluate(size_js)
            if size != last:
                last, stable_since = size, time.monotonic()
            elif time.monotonic() - stable_since >= settle_s:
                break
            time.sleep(0.25)
        dom = browser.evaluate("document.documentElement.outerHTML") or ""
        text = re.sub(r"\s+", " ", browser.evaluate(text_js) or "").strip()
        title = browser.evaluate("document.title") or ""
        shot = None
        if screenshot:
            folder = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="crdnd-browser-"))
            folder.mkdir(parents=True, exist_ok=True)
            shot = (folder / f"{name}.png").resolve()
            data = browser.call("Page.captureScreenshot", {"format": "png"})["data"]
            shot.write_bytes(base64.b64decode(data))
    finally:
        browser.close()
    headers = _Headers()
    headers.feed(dom)
    return Rendered(url=url, title=title, dom=dom, text=text, column_headers=headers.headers, screenshot=shot,
                    seconds=time.monotonic() - started, complete=complete)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python tests/browser_check.py URL [OUT_DIR]", file=sys.stderr)
        return 2
    try:
        page = render(argv[1], argv[2] if len(argv) == 3 else None)
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 1
    print(page.title)
    print(page.text)
    print("column headers:", ", ".join(page.column_headers) or "(none)")
    print(f"screenshot: {page.screenshot}  ({page.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
