"""The explorer page (``e5lite explain --html``) in a real browser: headless Chromium, the system's own (Debian's
``chromium``; E5LITE_CHROMIUM names another), driven by playwright, which downloads nothing here. The page is
opened from file:// with the network off and every request other than the page's own refused; it must render
with no console error and no request, follow a hovered token, follow its layer / head / text controls, and hand
its numbers over as JSON. The screenshot stays in the test's temporary folder (look at it: pytest --basetemp)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import e5lite
from e5lite.explain import explain, render_html

QUERY = "How much protein (Eiweiß) should a woman eat per day?"
PASSAGE = "The CDC's average requirement of protein for women (19–70) is 46 grams per day — café naïve."
STEP = 1 / 255  # the page holds attention as bytes: probability × 255


def chromium() -> str | None:
    named = os.environ.get("E5LITE_CHROMIUM")
    if named:
        return named
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    if chromium() is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or name one in E5LITE_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])  # root in CI containers
        yield b
        b.close()


@pytest.fixture(scope="module")
def data(minilm):
    return explain(minilm, QUERY, PASSAGE)


@pytest.fixture
def page(browser, data, tmp_path):
    """The page open from file://, offline; ``page.seen`` lists every request, ``page.errors`` every console
    error and uncaught exception."""
    path = tmp_path / "explorer.html"
    path.write_text(render_html(data), encoding="utf-8")
    context = browser.new_context(offline=True, viewport={"width": 1300, "height": 900})
    url = path.as_uri()
    context.route("**/*", lambda route: route.continue_() if route.request.url == url else route.abort())
    p = context.new_page()
    p.seen, p.errors = [], []
    p.on("request", lambda r: p.seen.append(r.url))
    p.on("console", lambda m: p.errors.append(m.text) if m.type == "error" else None)
    p.on("pageerror", lambda e: p.errors.append(str(e)))
    p.goto(url)
    p.wait_for_selector("#head-view line", state="attached")
    yield p
    context.close()


def lines(page) -> list[tuple[int, int, float]]:
    """The head view's lines: (attending token, attended token, opacity)."""
    return page.eval_on_selector_all(
        "#head-view line", "ls => ls.map(l => [+l.dataset.i, +l.dataset.j, +l.getAttribute('stroke-opacity')])"
    )


def assert_lines_show(page, probs_SS: np.ndarray, keep=lambda i, j: True) -> None:
    """The lines are those of ``probs_SS`` (the ones of 0.01 or more that ``keep`` lets through), as opaque."""
    got = {(i, j): a for i, j, a in lines(page)}
    want = {(i, j) for (i, j), a in np.ndenumerate(probs_SS) if keep(i, j) and a >= 0.01 + STEP}
    assert want <= set(got) and all(keep(i, j) for i, j in got)
    for (i, j), a in got.items():
        assert abs(a - probs_SS[i, j]) <= STEP, (i, j, a, probs_SS[i, j])


@pytest.mark.slow
def test_renders_offline_and_follows_hover_and_controls(page, data, tmp_path):
    att_q, att_p = (np.array(data["attentions"][s]) for s in ("query", "passage"))
    L, N, S = att_q.shape[:3]
    assert page.errors == [] and page.seen == [page.url]  # the page itself, nothing else
    assert page.eval_on_selector("#layer", "s => s.value") == str(L - 1)  # the last layer, head 0 to begin with
    assert_lines_show(page, att_q[L - 1, 0])
    assert page.locator("#model-view canvas").count() == L * N
    assert page.locator("#contrib td").count() == S * len(data["passage_tokens"])
    assert page.locator("#top-pairs li").count() == 10
    assert page.evaluate("window.e5liteData.cosine") == data["cosine"]

    # hover a token: only where it attends is left, and the model view fades every other row
    i = data["query_tokens"].index("protein")
    alpha = "c => c.getContext('2d').getImageData(0, 0, 1, 1).data[3]"  # row 0's first pixel, layer 0 head 0
    assert page.eval_on_selector("#model-view canvas", alpha) == 255
    page.hover(f"#head-view text[data-col=left][data-i='{i}']")
    assert page.eval_on_selector(f"#head-view text[data-col=left][data-i='{i}']", "t => t.classList.contains('focus')")
    assert_lines_show(page, att_q[L - 1, 0], keep=lambda a, b: a == i)
    assert page.eval_on_selector("#model-view canvas", alpha) < 255
    page.hover(f"#head-view text[data-col=right][data-i='{i}']")  # the other column: who attends to it
    assert_lines_show(page, att_q[L - 1, 0], keep=lambda a, b: b == i)
    page.screenshot(path=str(tmp_path / "explorer-hover.png"), full_page=True)
    page.mouse.move(1, 1)
    assert_lines_show(page, att_q[L - 1, 0])

    # the controls: a layer and head from the menus, another by clicking its map, then the other text
    page.select_option("#layer", "0")
    page.select_option("#head", "3")
    assert_lines_show(page, att_q[0, 3])
    assert page.eval_on_selector("#model-view canvas.selected", "c => [c.dataset.layer, c.dataset.head]") == ["0", "3"]
    page.click("#model-view canvas[data-layer='2'][data-head='5']")
    assert (
        page.eval_on_selector("#head", "s => s.value") == "5" and page.eval_on_selector("#layer", "s => s.value") == "2"
    )
    assert_lines_show(page, att_q[2, 5])
    page.select_option("#side", "passage")
    assert page.locator("#head-view text").count() == 2 * len(data["passage_tokens"])
    assert_lines_show(page, att_p[2, 5])
    page.select_option("#side", "query")
    page.select_option("#layer", str(L - 1))
    page.select_option("#head", "0")
    shot = tmp_path / "explorer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    assert page.errors == [] and page.seen == [page.url]


@pytest.mark.slow
def test_download_gives_the_numbers_as_json(page, data, tmp_path):
    with page.expect_download() as download:
        page.click("#download")
    got = json.loads(Path(download.value.path()).read_text())
    for key in ("query_tokens", "passage_tokens", "cosine", "contributions", "layers", "top_pairs"):
        assert got[key] == data[key], key
    for side in ("query", "passage"):
        np.testing.assert_allclose(np.array(got["attentions"][side]), np.array(data["attentions"][side]), atol=STEP / 2)
    assert page.errors == [] and all(u == page.url or u.startswith("blob:") for u in page.seen)


@pytest.mark.slow
def test_one_text_page(browser, minilm, tmp_path):
    path = tmp_path / "one.html"
    path.write_text(render_html(e5lite.explain(minilm, "just one text")), encoding="utf-8")
    context = browser.new_context(offline=True)
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    p.goto(path.as_uri())
    p.wait_for_selector("#head-view line", state="attached")
    assert errors == []
    assert p.is_hidden("#contrib-section") and p.is_hidden("#layers-section") and p.is_visible("#attention")
    context.close()
