"""ms.report and `marginscope report`: one self-contained HTML file, checked in headless Chromium
(no console error, no request beyond the file and its data: URLs, every figure decoded)."""

from __future__ import annotations

import fcntl
import html
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import marginscope as ms
from marginscope.cli import app
from trace_factory import make_trace

runner = CliRunner()
_CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """$CHROMIUM, else the first Chromium/Chrome on PATH."""
    candidates = [os.environ.get("CHROMIUM", ""), *(shutil.which(n) or "" for n in _CHROMIUM_NAMES)]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _high_fd(fd: int) -> int:
    """A copy of `fd` numbered ≥ 10 (close-on-exec), so the launcher can place the pipes at 3 and 4."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


# Puts the inherited pipe ends at fds 3 and 4, where --remote-debugging-pipe expects them, then execs.
_LAUNCHER = ("import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); "
             "os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])")


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
    commands on fd 3, replies and events on fd 4, NUL-separated JSON); no websocket library needed."""

    def __init__(self, chromium: str, profile: Path, timeout: float = 60.0) -> None:
        cmd_r, cmd_w = (_high_fd(fd) for fd in os.pipe())
        evt_r, evt_w = (_high_fd(fd) for fd in os.pipe())
        args = ["--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", f"--user-data-dir={profile}",
                "about:blank"]
        self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(cmd_r), str(evt_w), chromium, *args],
                                     pass_fds=(cmd_r, evt_w),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(evt_w)
        self._out = os.fdopen(cmd_w, "wb", buffering=0)
        self._in = os.fdopen(evt_r, "rb", buffering=0)
        self._messages: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self.timeout = timeout
        self._next_id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while chunk := self._in.read(1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                self._messages.put(json.loads(message))

    def _get(self, deadline: float) -> dict:
        return self._messages.get(timeout=max(0.05, deadline - time.monotonic()))

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._out.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._get(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def load(self, url: str) -> tuple[str, dict]:
        """Open `url` in a new tab, wait for its load event and a quiet moment; (session, page facts)."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.send(f"{domain}.enable", session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session for e in self.events):
            self.events.append(self._get(deadline))
        facts = self.send("Runtime.evaluate", {"returnByValue": True, "expression": """JSON.stringify({
            figures: [...document.querySelectorAll('figure')].map(f => f.dataset.figure),
            images: [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth})),
            scripts: document.scripts.length, stylesheets: document.styleSheets.length,
            links: [...document.querySelectorAll('link')].length, title: document.title,
            text: document.body.innerText.length})"""}, session=session)
        time.sleep(0.3)
        while not self._messages.empty():
            self.events.append(self._messages.get())
        return session, json.loads(facts["result"]["value"])

    def problems(self, session: str) -> list[str]:
        """Console errors, uncaught exceptions, error log entries and requests beyond file:/data:."""
        found = []
        for event in (e for e in self.events if e.get("sessionId") == session):
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
                found.append(f"console.{params['type']}: {params.get('args')}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails'].get('text')}")
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                found.append(f"log {params['entry']['level']}: {params['entry']['text']}")
            elif method == "Network.requestWillBeSent":
                url = params["request"]["url"]
                if not url.startswith(("file:", "data:", "about:")):
                    found.append(f"network request: {url}")
        return found

    def close(self) -> None:
        try:
            self.send("Browser.close")
            self.proc.wait(timeout=15)
        except Exception:  # noqa: BLE001 — a hung browser is killed below
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium not found (.ci/run installs it from Debian's packages; or set $CHROMIUM)")
    b = Browser(chromium, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [make_trace(root / "run-dpo.h5", loss="dpo"), make_trace(root / "run-kto.h5", loss="kto", seed=1),
            make_trace(root / "edge.h5", steps=(0,), per_token=(), inrun=False, nan=True, n_probes=1)]


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    return ms.report.write(runs, tmp_path_factory.mktemp("report") / "report.html")


def test_report_is_self_contained(report, runs):
    text = report.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not re.search(r"<script|<link|<iframe|@import|url\(|https?://", text, re.I)
    sources = re.findall(r'src="([^"]*)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    figures = re.findall(r'<figure id="([^"]+)" data-figure="([^"]+)"', text)
    expected = [(f"run-{key}-{name}", name) for key in ("run-dpo", "run-kto", "edge") for name in ms.plots.FIGURES]
    expected += [(f"comparison-{name}", name) for name in ms.plots.COMPARISONS]
    assert figures == expected and len(sources) == len(expected)
    for label in ("run-dpo.h5 · dpo", "run-kto.h5 · kto", "edge.h5 · dpo", "Comparison of runs", "Run metadata",
                  "loss_hparams", "Overview", "Case 1", "in-run pairs"):
        assert label in text, label


def test_report_prints_the_agreement_tables(report, runs):
    """Every run with two records or more gets the tables `marginscope inspect` prints (the same rows),
    inside its own section; the one-record run gets none."""
    text = report.read_text(encoding="utf-8")
    sections = {m.group(1): m.group(2) for m in re.finditer(r'<section id="run-([^"]+)">(.*?)</section>', text, re.S)}
    assert set(sections) == {"run-dpo", "run-kto", "edge"}
    for key, path in zip(("run-dpo", "run-kto", "edge"), runs):
        rows = [[html.unescape(c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row)]
                for row in re.findall(r"<tr>(.*?)</tr>", sections[key])]
        with ms.trace.open(path) as tr:
            tables = ms.trace.summary.agreement_tables(ms.trace.summarize(tr).agreement)
        assert ("What happened: the views against the observed change" in sections[key]) == bool(tables)
        assert bool(tables) == (key != "edge")
        for title, header, table_rows, caption in tables:
            assert header in rows and all(row in rows for row in table_rows), title
            assert html.escape(caption, quote=True) in sections[key]
        if tables:
            assert ["chosen", "actual update (first order)"] == tables[0][2][1][:2]


def test_report_in_headless_chromium(browser, report):
    session, page = browser.load(report.resolve().as_uri())
    assert browser.problems(session) == []
    assert page["scripts"] == 0 and page["links"] == 0 and page["stylesheets"] == 1  # the inline <style>
    assert page["figures"] == [*ms.plots.FIGURES] * 3 + [*ms.plots.COMPARISONS]
    assert len(page["images"]) == len(page["figures"]) and all(i["ok"] and i["w"] > 300 for i in page["images"])
    assert page["title"].startswith("marginscope report: run-dpo.h5 · dpo") and page["text"] > 2000


def test_browser_check_catches_errors(browser, tmp_path):
    """The check itself: a page with a console error, an exception, a broken image and a remote
    stylesheet reports all four."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><link rel="stylesheet" '
                   'href="https://example.invalid/x.css"></head><body><img src="missing.png">'
                   '<script>console.error("boom"); undefinedFunction();</script></body></html>')
    session, page = browser.load(bad.as_uri())
    problems = "\n".join(browser.problems(session))
    assert "console.error" in problems and "exception" in problems
    assert "ERR_FILE_NOT_FOUND" in problems and "network request: https://example.invalid/x.css" in problems
    assert page["images"] == [{"ok": False, "w": 0}]


def test_report_options_and_errors(runs, tmp_path):
    html = ms.report.render(runs[0], probe="q1", step=4, title="My <run>")
    assert "<title>My &lt;run&gt;</title>" in html and "figures for probe q1 · step 4" in html
    assert html.count("<figure") == len(ms.plots.FIGURES) and "Comparison of runs" not in html
    with pytest.raises(ms.MarginscopeError, match="step 5 is not recorded"):
        ms.report.write(runs[0], tmp_path / "r.html", step=5)
    assert not (tmp_path / "r.html").exists() and not list(tmp_path.iterdir())
    with pytest.raises(ms.MarginscopeError, match="is a directory"):
        ms.report.write(runs[0], tmp_path)
    with pytest.raises(ms.MarginscopeError, match="no such directory"):
        ms.report.write(runs[0], tmp_path / "missing" / "r.html")


def test_cli_report(runs, tmp_path):
    out = tmp_path / "report.html"
    res = runner.invoke(app, ["report", str(runs[0]), str(runs[1]), "-o", str(out), "--title", "two runs"])
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.stdout
    text = out.read_text(encoding="utf-8")
    assert "<title>two runs</title>" in text and text.count("<figure") == 2 * len(ms.plots.FIGURES) + 2
    res = runner.invoke(app, ["report", str(tmp_path / "missing.h5"), "-o", str(out)])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "no such trace file" in res.stderr
    res = runner.invoke(app, ["report", str(runs[0]), "-o", str(out), "--probe", "zz"])
    assert res.exit_code == 2 and "no probe 'zz'" in res.stderr and res.stderr.count("\n") == 1
    res = runner.invoke(app, ["report", "--help"])
    assert res.exit_code == 0 and "marginscope report run-dpo.h5 run-ipo.h5 -o report.html" in res.stdout
