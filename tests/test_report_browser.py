"""The HTML report in a real browser: headless Chromium loads it, every plot decodes to a
non-empty image, nothing is logged as an error, and the screenshot is not blank.

Chromium comes from Debian's ``chromium`` package (.ci/run installs it). Outside CI the test is
skipped when it is missing; in CI (CI=true) a missing browser is a failure, not a skip."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from tests.test_report import _run

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")

PROBE_HEAD = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && e.target.src) || e)), true);
</script>"""
PROBE_BODY = """<pre id="probe"></pre><script>
window.addEventListener('load', () => {
  const images = [...document.images].map(
    i => ({id: i.id, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}));
  document.getElementById('probe').textContent = JSON.stringify({images, errors: window.__errors});
});
</script>"""


def chromium(*args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
    ]
    return subprocess.run([BROWSER, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def report_html(tmp_path, tiny_dir):
    result = _run(tmp_path, tiny_dir, "")
    assert result.exit_code == 0, result.output
    return tmp_path / "out" / "report.html"


def test_report_renders_in_chromium_with_its_images(report_html, tmp_path):
    if BROWSER is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed")
    page = report_html.read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</head>", PROBE_HEAD + "</head>").replace("</body>", PROBE_BODY + "</body>"))
    profile = tmp_path / "profile"
    dom = chromium(f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", probed.as_uri())
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert match, dom.stderr[-2000:]
    probe = json.loads(match.group(1).replace("&quot;", '"'))
    assert probe["errors"] == []
    assert [image["id"] for image in probe["images"]] == ["plot-perplexity", "plot-divergence"]
    assert all(image["complete"] and image["w"] > 100 and image["h"] > 100 for image in probe["images"])
    assert "CONSOLE" not in dom.stderr or "Uncaught" not in dom.stderr

    shot = tmp_path / "shot.png"
    chromium(f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1000,1600", report_html.as_uri())
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] > 500 and pixels[..., :3].std() > 0.05, "the screenshot is blank"
