"""Look at the built site in a real browser: ``python docs/_scripts/check_site.py [--out DIR]``.

Builds the site (``mkdocs build --strict``) into a temporary folder, serves it on 127.0.0.1 and
opens the main pages in headless Chromium at 1280 px and 390 px wide. For each page and width it
saves a screenshot under ``--out`` (default ``out/site_check``) and fails, listing the offenders,
when

* a code block is wider than its column at 1280 px (its lines would have to be scrolled to),
* the page itself is wider than the window (at either width), or
* raw TeX (``\\(``, ``\\[``, ``$$``) is left in the rendered text outside code.

The checks run inside the page: the server appends a small script to each HTML page it serves
(the built files are not changed), and Chromium's ``--dump-dom`` prints the verdict the script
writes into the document. Only Chromium and the standard library are needed.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [
    "",
    "getting-started/",
    "concepts/",
    "choosing/",
    "coming-from/jaxopt/",
    "coming-from/torchopt/",
    "guides/deq/",
    "guides/hyperparameters/",
    "benchmarks/",
    "api/implicit_layers/",
    "api/linear/",
]
WIDTHS = (1280, 390)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Runs after the page has loaded and laid out; writes its findings as JSON into a <pre> element
# that --dump-dom prints.
PROBE = """
<script>
window.addEventListener("load", () => {
  const found = {code: [], page: null, tex: []};
  const wide = window.innerWidth >= 1000;
  // Material scrolls the <code> inside each <pre>: an overflow shows on either.
  for (const pre of document.querySelectorAll(".md-content pre, .md-content pre > code")) {
    if (wide && pre.scrollWidth > pre.clientWidth + 1) {
      const line = (pre.innerText.split("\\n").sort((a, b) => b.length - a.length)[0] || "");
      found.code.push(line.slice(0, 120));
    }
  }
  const root = document.documentElement;
  if (root.scrollWidth > window.innerWidth + 1) found.page = root.scrollWidth;
  const walker = document.createTreeWalker(document.querySelector(".md-content") || document.body,
                                           NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement.closest("pre, code, script, style, math")) continue;
    const m = node.textContent.match(/\\\\\\(|\\\\\\[|\\$\\$/);
    if (m) found.tex.push(node.textContent.trim().slice(0, 80));
  }
  const out = document.createElement("pre");
  out.id = "site-check";
  out.hidden = true;  // in the DOM for --dump-dom, not in the screenshots
  out.textContent = "SITE-CHECK " + JSON.stringify(found);
  document.body.appendChild(out);
});
</script>
"""
VERDICT = re.compile(r"SITE-CHECK (\{.*?\})</pre>", re.DOTALL)


def find_browser() -> str | None:
    """The path of a Chromium-family browser on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


class _ProbingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site; HTML pages get the probe script before ``</body>``."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass

    def send_head(self):  # type: ignore[no-untyped-def]
        path = Path(self.translate_path(self.path))
        if path.is_dir():
            path = path / "index.html"
        if path.suffix != ".html" or not path.is_file():
            return super().send_head()
        body = path.read_bytes().replace(b"</body>", PROBE.encode() + b"</body>", 1)
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


def build(site: Path) -> None:
    """``mkdocs build --strict`` of this repository into ``site``."""
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(site)],
        cwd=ROOT,
        check=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)},
    )


def _chromium(browser: str, width: int, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--no-first-run", "--disable-extensions", f"--window-size={width},2200", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def check_page(browser: str, url: str, width: int, shot: Path) -> list[str]:
    """Screenshot ``url`` at ``width`` into ``shot``; return the problems found (empty if none)."""
    _chromium(browser, width, f"--screenshot={shot}", url)
    dom = _chromium(browser, width, "--dump-dom", url).stdout
    m = VERDICT.search(dom)
    if m is None:
        return [f"{url} at {width} px: the page did not report (did it load?)"]
    found = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                       .replace("&gt;", ">"))
    problems = [f"{url} at {width} px: code block wider than its column: {line!r}" for line in found["code"]]
    if found["page"]:
        problems.append(f"{url} at {width} px: page is {found['page']} px wide")
    problems += [f"{url} at {width} px: raw TeX in the text: {text!r}" for text in found["tex"]]
    return problems


def check_site(out: Path, site: Path | None = None, pages: list[str] | None = None) -> list[str]:
    """Build (unless ``site`` is given), serve and check the pages; return every problem found.

    Raises:
        RuntimeError: no Chromium-family browser is installed.
    """
    browser = find_browser()
    if browser is None:
        raise RuntimeError(f"no browser found: install one of {', '.join(BROWSERS)} "
                           "(Debian: apt-get install chromium)")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if site is None:
            site = Path(tmp) / "site"
            build(site)
        handler = functools.partial(_ProbingHandler, directory=str(site))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            base = f"http://127.0.0.1:{server.server_address[1]}/"
            problems: list[str] = []
            for page in pages if pages is not None else PAGES:
                for width in WIDTHS:
                    name = (page.strip("/").replace("/", "_") or "index") + f"_{width}.png"
                    problems += check_page(browser, base + page, width, out / name)
            return problems
        finally:
            server.shutdown()
            server.server_close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "out" / "site_check"), help="folder of the screenshots")
    p.add_argument("--site", default=None, help="an already built site (skips the build)")
    p.add_argument("pages", nargs="*", help="pages to check, e.g. choosing/ (default: the main ones)")
    a = p.parse_args(argv)
    problems = check_site(Path(a.out), Path(a.site) if a.site else None, a.pages or None)
    for line in problems:
        print(line)
    print(f"{len(problems)} problems; screenshots in {a.out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
