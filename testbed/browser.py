"""A real headless browser for tests, to see a page as a reader does, its scripts run.

Chromium (the distribution's package), driven over its DevTools protocol:

::

    with Browser.start(folder) as browser:
        browser.open("http://127.0.0.1:8000/")
        browser.wait_for("document.querySelectorAll('.md-search-result__item').length")
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import subprocess
import time
import urllib.request
from typing import TYPE_CHECKING, Any

from testbed.cluster import ensure_tools

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

    from typing_extensions import Self

START_S = 30.0
CALL_S = 15.0


class Browser:
    """One headless Chromium with one page; every wait is bounded."""

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        import websocket  # noqa: PLC0415 -- the test extra's, for this class only

        self._process = process
        self._port = port
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT"
        )
        with urllib.request.urlopen(request, timeout=CALL_S) as answer:  # noqa: S310
            target = json.load(answer)
        self._ws = websocket.create_connection(
            target["webSocketDebuggerUrl"], timeout=CALL_S, suppress_origin=True
        )
        self._ids = itertools.count(1)

    @classmethod
    def start(cls, profile: Path) -> Browser:
        """Chromium, installed first if it is missing (apt-get, as root), with ``profile``."""
        chromium = ensure_tools(["chromium"], ["chromium"], "apt-get install chromium")["chromium"]
        log = profile / "chromium.log"  # a file, not a pipe: nothing must read it for it to go on
        with log.open("wb") as stderr:
            process = subprocess.Popen(
                [
                    chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--remote-debugging-port=0",
                    "--remote-allow-origins=*", f"--user-data-dir={profile}", "about:blank",
                ],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )  # fmt: skip
        try:
            return cls(process, _devtools_port(process, log))
        except BaseException:
            process.kill()
            process.wait(timeout=CALL_S)
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """The browser goes, and its processes with it."""
        with contextlib.suppress(Exception):
            self._ws.close()
        self._process.kill()
        self._process.wait(timeout=CALL_S)

    def open(self, url: str) -> None:
        """Load ``url`` in the page and wait for its load event."""
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` in the page."""
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return answer.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Until ``expression`` is truthy in the page: its value; TimeoutError past ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                msg = f"not true within {timeout:g} s in the browser: {expression}"
                raise TimeoutError(msg)
            time.sleep(0.1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command, and its result (its events meanwhile are dropped)."""
        number = next(self._ids)
        self._ws.send(json.dumps({"id": number, "method": method, "params": params}))
        deadline = time.monotonic() + CALL_S
        while time.monotonic() < deadline:
            message = json.loads(self._ws.recv())
            if message.get("id") == number:
                if "error" in message:
                    msg = f"{method}: {message['error']}"
                    raise RuntimeError(msg)
                result: dict[str, Any] = message.get("result", {})
                return result
        msg = f"{method}: no answer within {CALL_S:g} s"
        raise TimeoutError(msg)


def _devtools_port(process: subprocess.Popen[bytes], log: Path) -> int:
    """The port Chromium says it listens on (it writes it to stderr, ``log``, at start)."""
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline and process.poll() is None:
        m = re.search(rb"DevTools listening on ws://127\.0\.0\.1:(\d+)/", log.read_bytes())
        if m:
            return int(m[1])
        time.sleep(0.05)
    msg = f"chromium did not open its DevTools port within {START_S:g} s: {log.read_text()[-2000:]}"
    raise RuntimeError(msg)
