"""Checks of the built HTML book in headless Chromium, with the network blocked.

Run after ``jupyter-book build .`` (``make test`` does both). Every page of the table of contents is
opened as a reader would open it; a page fails if math is left unrendered, an image is missing or
remote, or Sphinx or a notebook cell left an error box. A screenshot of each page is saved under
``_build/screenshots/``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
REQUIRED = os.environ.get("GRADIV_REQUIRE_BOOK") == "1"

pytestmark = pytest.mark.book


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def _toc_pages() -> list[Path]:
    """The HTML page of every file in _toc.yml."""
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    walk(toc.get("parts"))
    walk(toc.get("chapters"))
    return [HTML / f"{f}.html" for f in files]


def _prerequisites() -> str:
    chromium = _chromium()
    missing = []
    if not (HTML / "index.html").exists():
        missing.append(f"the built book ({HTML / 'index.html'}; run `make book`)")
    if chromium is None:
        missing.append("Chromium (`apt-get install chromium`)")
    if missing:
        message = "cannot check the built book: missing " + " and ".join(missing)
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    return chromium


def _render(chromium: str, page: Path, *args: str) -> subprocess.CompletedProcess:
    """Open ``page`` in headless Chromium with every host unresolvable (no network)."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={SHOTS / '.profile'}",
           "--virtual-time-budget=15000", "--window-size=1280,1800", *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


class _VisibleText(HTMLParser):
    """Collects the text a reader sees (not code, scripts or rendered math) and the images."""

    HIDDEN = {"script", "style", "code", "pre", "mjx-container", "mjx-assistive-mml", "textarea", "svg",
              "noscript", "template"}
    VOID = {"img", "br", "hr", "meta", "link", "input", "source", "area", "base", "col", "embed", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.text: list[str] = []
        self.images: list[str] = []
        self.error_boxes: list[str] = []
        self.math_errors: list[str] = []
        self.math_rendered = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "img":
            self.images.append(attrs.get("src") or "")
        if tag == "mjx-container":
            self.math_rendered += 1
        # MathJax 3's output for a TeX error (merror, with data-mjx-error) and for an undefined macro (red text)
        if tag == "mjx-merror" or "data-mjx-error" in attrs or (
                tag.startswith("mjx-") and re.search(r"color:\s*red", attrs.get("style") or "")):
            self.math_errors.append(f"<{tag} {attrs.get('data-mjx-error') or attrs.get('style') or ''}>")
        if "system-message" in classes or "traceback" in classes or "problematic" in classes:
            self.error_boxes.append(f"<{tag} class={attrs.get('class')!r}>")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        while self.stack:
            if self.stack.pop() == tag:
                break

    def handle_data(self, data):
        if not any(t in self.HIDDEN for t in self.stack):
            self.text.append(data)


RAW_MATH = re.compile(r"\\\(|\\\[|\$\$|(?<![\w$])\$[^$\s][^$\n]{0,200}?\$(?![\w$])")


def _assert_decodable(image: Path) -> None:
    """Fail unless ``image`` is a well-formed SVG or a raster image PIL can decode."""
    if image.suffix.lower() == ".svg":
        import xml.etree.ElementTree as ET

        assert ET.parse(image).getroot().tag.endswith("svg"), f"{image} is not an SVG"
        return
    from PIL import Image

    with Image.open(image) as im:
        im.verify()


def _page_id(page: Path) -> str:
    return str(page.relative_to(HTML)) if page.is_relative_to(HTML) else page.name


@pytest.mark.parametrize("page", _toc_pages(), ids=_page_id)
def test_page_renders_offline(page: Path) -> None:
    chromium = _prerequisites()
    assert page.exists(), f"{page} is listed in _toc.yml but was not built"
    SHOTS.mkdir(parents=True, exist_ok=True)

    dom = _render(chromium, page, "--dump-dom")
    assert dom.returncode == 0, f"Chromium failed on {page}: {dom.stderr[-2000:]}"
    parsed = _VisibleText()
    parsed.feed(dom.stdout)

    source = page.read_text(encoding="utf-8")
    math_in_source = len(re.findall(r'class="math[ "]|class="math notranslate', source))
    if math_in_source:
        assert parsed.math_rendered > 0, f"{page}: {math_in_source} math elements but MathJax rendered none (offline)"
    visible = " ".join(parsed.text)
    raw = RAW_MATH.findall(visible)
    assert not raw, f"{page}: unrendered math in the visible text: {raw[:5]}"
    assert not parsed.math_errors, f"{page}: MathJax could not typeset some math: {parsed.math_errors[:5]}"

    assert not parsed.error_boxes, f"{page}: error boxes in the page: {parsed.error_boxes[:5]}"

    for src in parsed.images:
        assert src, f"{page}: an <img> without src"
        if src.startswith("data:"):
            continue
        assert not re.match(r"^(https?:)?//", src), f"{page}: image {src} needs the network"
        image = (page.parent / src.split("#")[0].split("?")[0]).resolve()
        assert image.is_file() and image.stat().st_size > 0, f"{page}: missing image {src}"
        _assert_decodable(image)

    shot = SHOTS / (_page_id(page).replace("/", "__").replace(".html", ".png"))
    result = _render(chromium, page, f"--screenshot={shot}")
    assert result.returncode == 0 and shot.is_file(), f"no screenshot of {page}: {result.stderr[-2000:]}"


def test_launch_buttons_point_at_the_notebooks() -> None:
    """Colab and Binder buttons on a notebook page open that very notebook on the main branch."""
    _prerequisites()
    for page in _toc_pages():
        notebook = page.relative_to(HTML).with_suffix(".ipynb")
        if not (ROOT / notebook).exists():
            continue
        html = page.read_text(encoding="utf-8")
        colab = f"https://colab.research.google.com/github/gradiv/gradiv/blob/main/{notebook.as_posix()}"
        binder = f"https://mybinder.org/v2/gh/gradiv/gradiv/main?urlpath=lab/tree/{notebook.as_posix()}"
        assert colab in html, f"{page}: no Colab button for {notebook}"
        assert binder in html, f"{page}: no Binder button for {notebook}"


def test_live_code_button_starts_a_binder_kernel_in_the_page() -> None:
    """Every notebook page has Thebe's "Live Code" button, configured for this repository's Binder
    environment (.binder/, on mybinder.org, Thebe's default) on main, with the kernel in the notebook's folder,
    so an online reader can move the widgets without leaving the book."""
    _prerequisites()
    pages = 0
    for page in _toc_pages():
        if not (ROOT / page.relative_to(HTML).with_suffix(".ipynb")).exists():
            continue
        html = page.read_text(encoding="utf-8")
        assert "initThebeSBT()" in html and "Live Code" in html, f"{page}: no Live Code (Thebe) button"
        config = re.search(r'<script type="text/x-thebe-config">(.*?)</script>', html, re.S)
        assert config, f"{page}: no Thebe configuration"
        assert 'repo: "gradiv/gradiv"' in config.group(1) and 'ref: "main"' in config.group(1), config.group(1)
        folder = page.relative_to(HTML).parent.as_posix()
        assert f'path: "./{folder}"' in config.group(1), config.group(1)       # the kernel starts beside the notebook
        pages += 1
    assert pages >= 20


def test_mathjax_errors_are_caught() -> None:
    """The math-error check can fail: a copy of a built page with a TeX error (a double exponent) and an
    undefined macro. (A formula MathJax cannot even delimit stays raw text, which RAW_MATH catches.)"""
    chromium = _prerequisites()
    page = HTML / "book" / "ch01_gradient_diversity" / "01_what_is_diversity.html"
    html = page.read_text(encoding="utf-8")
    spans = list(re.finditer(r'(<span class="math notranslate nohighlight">)\\\((.*?)\\\)(</span>)', html))
    assert len(spans) >= 2, "no inline math on the probe page"
    first, second = spans[0], spans[1]
    broken = (html[:first.start()] + first.group(1) + r"\(x^1^2\)" + first.group(3)
              + html[first.end():second.start()] + second.group(1) + r"\(\nosuchmacro x\)" + second.group(3)
              + html[second.end():])
    probe = page.with_name("_mathjax_probe.html")
    probe.write_text(broken, encoding="utf-8")
    try:
        dom = _render(chromium, probe, "--dump-dom")
        parsed = _VisibleText()
        parsed.feed(dom.stdout)
        assert len(parsed.math_errors) >= 2, f"the broken formulas were not reported: {parsed.math_errors}"
    finally:
        probe.unlink()

