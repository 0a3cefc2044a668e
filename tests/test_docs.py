"""The documentation site: built with warnings as errors, read in a real browser, searched.

The site is mkdocs.yml's (MkDocs, Material, mkdocstrings): the guides of docs/, the API reference
generated from the docstrings. Every Python block of its pages runs in tests/test_readme.py.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import torchrunx
from testbed.browser import Browser
from testbed.cluster import ClusterUnavailableError

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO = Path(__file__).resolve().parents[1]
README_MOST_LINES = 200


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *_args: object) -> None:
        """Not a line per request in the test's output."""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The site, built as CI builds it (``mkdocs build --strict``), served on loopback."""
    folder = tmp_path_factory.mktemp("site")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert built.returncode == 0, built.stderr
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    try:
        started = Browser.start(tmp_path_factory.mktemp("chromium"))
    except ClusterUnavailableError as e:  # not root, or no apt-get: nothing to install it with
        pytest.skip(f"no Chromium on this machine: {e}")
    with started:
        yield started


def article_text(browser: Browser) -> str:
    text: str = browser.wait_for("document.querySelector('article')?.innerText")
    return text


def test_the_front_page_renders_with_its_guides(site: str, browser: Browser) -> None:
    browser.open(site)
    text = article_text(browser)
    assert "Warm agents, fresh workers" in text
    links = browser.evaluate("[...document.querySelectorAll('nav a')].map(a => a.textContent)")
    for guide in ("Getting started", "Sweeps", "Preemption and restarts", "API reference"):
        assert any(guide in link for link in links), (guide, links)


def test_the_api_page_has_every_public_name_and_field(site: str, browser: Browser) -> None:
    browser.open(site + "reference/")
    article_text(browser)
    anchors = set(browser.evaluate("[...document.querySelectorAll('[id]')].map(e => e.id)"))
    for name in torchrunx.__all__:
        assert f"torchrunx.{name}" in anchors, name
    for field in dataclasses.fields(torchrunx.Launcher):
        if field.init:
            assert f"torchrunx.Launcher.{field.name}" in anchors, field.name
    for method in ("run", "submit", "view", "sweep", "close"):
        assert f"torchrunx.Launcher.{method}" in anchors, method
    for error, attribute in [
        ("WorkerFailedError", "signal_name"), ("WorkerFailedError", "last_lines"),
        ("AgentFailedError", "hostname"), ("PreemptedError", "partial_results"),
        ("NotRunError", "reason"), ("DebuggerQuitError", "rank"),
    ]:  # fmt: skip
        assert f"torchrunx.{error}.{attribute}" in anchors, (error, attribute)
    text = article_text(browser)
    assert "Seconds an agent may take to start" in text  # agent_timeout's docstring
    assert ":class:" not in text  # no reST markup leaks into the page


def test_search_finds_the_launcher_for_agent_timeout(site: str, browser: Browser) -> None:
    browser.open(site + "?q=agent_timeout")
    browser.wait_for("document.querySelectorAll('.md-search-result__item').length")
    hits = browser.evaluate(
        "[...document.querySelectorAll('.md-search-result__item a')].map(a => a.href)"
    )
    first = hits[0] if "#" in hits[0] else hits[1]  # the page itself, then its sections
    assert "/reference/" in first
    assert first.endswith("#torchrunx.Launcher.agent_timeout"), hits


def test_the_readme_is_a_front_page_whose_links_hold() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= README_MOST_LINES
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (REPO / target).exists(), target
    for guide in ("sweeps", "restarts-preemption", "failures", "command-line", "migrating"):
        assert f"(docs/guides/{guide}.md)" in text, guide  # the features lead into the site
