"""Headless-Chromium screenshots of optuna-dashboard on a study: the trial page with its note,
the study page with the custom charts, and the study note; plus what a user cannot see in a PNG
alone: whether the page is wider than the window.

It starts ``python -m search.dashboard`` on the study's storage (a free port on 127.0.0.1),
drives Chromium through the DevTools protocol over a pipe (``--remote-debugging-pipe``: no
websocket library needed), waits until each page shows what it should, and writes PNGs and a
``report.json`` (window and page widths, the note's visible text length, the charts found).

Chromium: ``apt-get install -y chromium`` (Debian), or pass ``--chromium``. Not part of the
test suite: it checks what tests/search_tests/test_dashboard.py cannot, the rendering.

Usage::

    python benchmarks/dashboard_screenshot.py --storage sqlite:///runs/search.db --out runs/screenshots
    python benchmarks/dashboard_screenshot.py --storage sqlite:///runs/search.db --trial 12 --width 1280
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search.progress import front_trials  # noqa: E402


class DevTools:
    """A minimal Chrome DevTools protocol client over ``--remote-debugging-pipe`` (fd 3: commands
    in, fd 4: replies out; JSON messages ended by a NUL byte)."""

    def __init__(self, chromium: str, width: int, height: int) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Out of the way of 3 and 4 before the child moves them there.
        hi_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
        hi_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)

        def child_fds() -> None:
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        # A fresh profile, removed on close.
        self._profile = tempfile.mkdtemp(prefix="chromium-shot-")
        args = [
            chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--remote-debugging-pipe",
            f"--window-size={width},{height}",
            f"--user-data-dir={self._profile}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args,
            pass_fds=(3, 4, hi_r, hi_w),
            preexec_fn=child_fds,  # noqa: PLW1509
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in (to_chrome_r, from_chrome_w, hi_r, hi_w):
            os.close(fd)
        self._buf = b""
        self._id = 0
        self.session: str | None = None

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: bool = True,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Send one command and return its result (events in between are skipped)."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" not in self._buf:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
        raise TimeoutError(method)

    def open(self, width: int, height: int) -> None:
        """A page of ``width`` x ``height`` CSS pixels, attached."""
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.call(
            "Target.attachToTarget", {"targetId": target, "flatten": True}, session=False
        )["sessionId"]
        self.call("Page.enable")
        self.resize(width, height)

    def resize(self, width: int, height: int) -> None:
        """Set the window (viewport) size."""
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result.get("result", {}).get("value")

    def goto(self, url: str, ready: str, timeout: float = 30.0) -> bool:
        """Navigate and wait until the JavaScript expression ``ready`` is true."""
        self.call("Page.navigate", {"url": url})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.eval(ready):
                time.sleep(1.0)  # let charts and fonts settle
                return True
            time.sleep(0.3)
        return False

    def screenshot(self, path: Path) -> None:
        """The viewport as a PNG."""
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        """Quit Chromium."""
        try:
            self.call("Browser.close", session=False, timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)


WIDTHS = """JSON.stringify({window: window.innerWidth, page: document.documentElement.scrollWidth,
  widest: Math.max(...[...document.querySelectorAll('body *')].map(e => e.getBoundingClientRect().right))})"""
# What makes a page wider than the window: the text lines (text nodes' rendered boxes) that
# reach past it, widest first, with the element holding them.
CULPRITS = """(() => {
  const found = [];
  const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walk.nextNode(); n; n = walk.nextNode()) {
    const range = document.createRange();
    range.selectNodeContents(n);
    const width = Math.max(0, ...[...range.getClientRects()].map(r => r.width));
    const right = Math.max(0, ...[...range.getClientRects()].map(r => r.right));
    if (right > window.innerWidth + 1)
      found.push({tag: n.parentElement.tagName.toLowerCase(), width: Math.round(width),
                  text: n.textContent.slice(0, 100)});
  }
  return JSON.stringify(found.sort((a, b) => b.width - a.width).slice(0, 4));
})()"""


def _note_probe(title: str) -> str:
    """JS: the rendered note whose first heading starts with ``title``: its box and text length,
    and whether its content overflows its box horizontally."""
    return f"""(() => {{
  const h = [...document.querySelectorAll('h1,h2,h3')].find(e => e.textContent.startsWith({json.dumps(title)}));
  if (!h) return null;
  let box = h.parentElement;
  const r = box.getBoundingClientRect();
  const tables = [...box.querySelectorAll('table')].map(t => t.getBoundingClientRect().width);
  return JSON.stringify({{left: r.left, right: r.right, width: r.width, scrollWidth: box.scrollWidth,
    clientWidth: box.clientWidth, text: box.innerText.length, tables: tables.length,
    widest_table: Math.max(0, ...tables)}});
}})()"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the dashboard exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 (127.0.0.1 only)
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"the dashboard did not answer at {url}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--storage", default="sqlite:///runs/search.db")
    p.add_argument(
        "--store", default=None, help="root of artifacts/ (default: beside the SQLite file)"
    )
    p.add_argument("--name", default=None, help="study name (default: the storage's first study)")
    p.add_argument(
        "--trial", type=int, default=None, help="trial number (default: the front's highest ratio)"
    )
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=900)
    p.add_argument(
        "--tall", type=int, default=2400, help="window height of the whole-note screenshot"
    )
    p.add_argument("--out", default="runs/screenshots")
    p.add_argument(
        "--chromium",
        default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium",
    )
    args = p.parse_args(argv)
    if not shutil.which(args.chromium):
        print(
            f"error: no Chromium at {args.chromium!r}; apt-get install -y chromium, or pass --chromium",
            file=sys.stderr,
        )
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = args.name or optuna.get_all_study_names(args.storage)[0]
    study = optuna.load_study(study_name=name, storage=args.storage)
    front = front_trials(study.trials)
    number = (
        args.trial
        if args.trial is not None
        else (front[-1].number if front else study.trials[-1].number)
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    cmd = [sys.executable, "-m", "search.dashboard", "--storage", args.storage, "--port", str(port)]
    if args.store:
        cmd += ["--store", args.store]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    report: dict[str, Any] = {
        "study_name": name,
        "trial_number": number,
        "window": [args.width, args.height],
    }
    browser = None
    try:
        _wait_http(f"{base}/api/meta", server)
        study_id = next(
            s["study_id"]
            for s in json.loads(urllib.request.urlopen(f"{base}/api/studies").read())[
                "study_summaries"
            ]  # noqa: S310
            if s["study_name"] == name
        )
        browser = DevTools(args.chromium, args.width, args.height)
        browser.open(args.width, args.height)
        title = f"Trial {number}:"
        pages = {
            "trial": (
                f"{base}/dashboard/studies/{study_id}/trials?numbers={number}",
                f"[...document.querySelectorAll('h3')].some(e => e.textContent.startsWith({json.dumps(title)}))",
            ),
            "study": (
                f"{base}/dashboard/studies/{study_id}",
                "document.querySelectorAll('.js-plotly-plot').length >= 2",
            ),
            "study_note": (
                f"{base}/dashboard/studies/{study_id}/note",
                f"[...document.querySelectorAll('h2')].some(e => e.textContent.startsWith({json.dumps(name)}))",
            ),
        }
        for key, (url, ready) in pages.items():
            ok = browser.goto(url, ready)
            entry: dict[str, Any] = {
                "url": url.replace(base, ""),
                "ready": ok,
                "widths": json.loads(browser.eval(WIDTHS)),
            }
            if entry["widths"]["page"] > args.width:
                entry["wider_than_window_because"] = json.loads(browser.eval(CULPRITS))
            if key == "trial":
                probe = browser.eval(_note_probe(title))
                entry["note"] = json.loads(probe) if probe else None
                # The whole note at once: a tall window of the same width.
                browser.eval("window.scrollTo(0, 0)")
                browser.resize(args.width, args.tall)
                time.sleep(1.0)
                browser.screenshot(out / "trial-note.png")
                browser.resize(args.width, args.height)
            if key == "study":
                entry["charts"] = browser.eval(
                    "[...document.querySelectorAll('.js-plotly-plot .gtitle')].map(e => e.textContent)"
                )
                for shot, words in (
                    ("chart-front", "Pareto front of"),
                    ("chart-bytes", "Bytes per unit"),
                ):
                    found = browser.eval(f"""(() => {{
                      const t = [...document.querySelectorAll('.js-plotly-plot .gtitle')]
                        .find(e => e.textContent.includes({json.dumps(words)}));
                      if (!t) return false;
                      t.closest('.js-plotly-plot').scrollIntoView({{block: 'center'}});
                      return true; }})()""")
                    if found:
                        time.sleep(0.5)
                        browser.screenshot(out / f"{shot}.png")
                browser.eval("window.scrollTo(0, 0)")
            browser.screenshot(out / f"{key}.png")
            report[key] = entry
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        server.wait(timeout=10)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
