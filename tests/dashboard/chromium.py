"""Debian's headless Chromium, driven from the command line (no DevTools client, no new
dependency): --dump-dom prints the DOM once --virtual-time-budget ms of page time have passed
(timers run in virtual time, which stops while a fetch is in flight, so a poll loop gets its
answers), --screenshot writes a PNG."""

from __future__ import annotations

import os
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
         "track", "wbr"}


def have_chromium() -> bool:
    return os.access(CHROMIUM, os.X_OK)


def run_chromium(url: str, work_dir: Path, *, screenshot: Path | None = None,
                 budget_ms: int = 3000, window: tuple[int, int] = (1280, 900)) -> str:
    """The DOM after `budget_ms` of virtual time, or (with `screenshot`) write a PNG there.
    A fresh profile each time: no sessionStorage or cache carries over between loads."""
    profile = tempfile.mkdtemp(prefix="chromium-", dir=work_dir)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
           f"--window-size={window[0]},{window[1]}"]
    cmd += [f"--screenshot={screenshot}"] if screenshot is not None else ["--dump-dom"]
    proc = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if screenshot is not None:
        assert screenshot.exists(), proc.stderr[-3000:]
    return proc.stdout


class _IdCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.elements: dict[str, dict] = {}
        self._stack: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        ident = attrs.get("id")
        if ident is not None:
            self.elements[ident] = {"attrs": attrs, "text": "", "value": attrs.get("data-value")}
        if tag not in _VOID:
            self._stack.append((tag, ident))

    def handle_endtag(self, tag):
        while self._stack:
            if self._stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        for _, ident in self._stack:
            if ident is not None:
                self.elements[ident]["text"] += data


def elements_by_id(html: str) -> dict[str, dict]:
    """id -> {"attrs", "text" (all text inside), "value" (data-value, the unformatted number)}."""
    parser = _IdCollector()
    parser.feed(html)
    return parser.elements


def number(elements: dict[str, dict], ident: str) -> float:
    value = elements[ident]["value"]
    assert value not in (None, ""), f"#{ident} shows no number: {elements[ident]}"
    return float(value)
