"""The chat page (`GET /`) in a real headless browser against the real `deltamem-edge serve` on 127.0.0.1.

The browser is Debian's ``chromium`` (``make test`` installs it with apt), driven by Playwright
through ``executable_path``: no browser is downloaded.  Without chromium the test FAILS with
a message saying how to install it; it is never skipped.

What is checked: the page and its files are public, carry a strict Content-Security-Policy
and hold no inline script, style or outside URL; the API key is asked once (the first call's
401) and kept in session storage; a message streams in (several chunks) and is the reply the
API gives any client and the one written into the memory file; the memory panel shows the
file's counters, size and fingerprints, and per-layer state norms and last-turn changes equal
to numpy on the state files (before and after the turn) read by this test; switching memory
ids switches the panel; a reload keeps the key, the memory id and the counters; Forget
deletes the file; Stop cuts a long reply, and the cut turn is saved.  A screenshot goes to
build/test-artifacts/chat-page.png.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from serving import U, chat, serve

from deltamem_edge.statefile import read_state_file

ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "test-artifacts"
KEY = "page-key-1"
WAIT_MS = 30_000
LONG_PROMPTS = ("Tell me a very long story", "One more long story", "And then?")  # see test_server.py


def chromium() -> str:
    """Debian's chromium (or DELTAMEM_CHROMIUM); a missing browser is a failure, not a skip."""
    found = os.environ.get("DELTAMEM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("the chat page test needs Debian's chromium: `make test` installs it, or run "
                    "`apt-get install -y chromium` (or set DELTAMEM_CHROMIUM to a Chromium binary)", pytrace=False)
    return found


@contextmanager
def browser(executable: str) -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable)
        try:
            yield b
        finally:
            b.close()


def watch(page: Page) -> list[str]:
    """JS errors and Content-Security-Policy violations the page runs into (must stay empty)."""
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" and (
        "Content Security Policy" in msg.text or "Refused to" in msg.text) else None)
    return problems


def frobenius_per_layer(state: np.ndarray) -> np.ndarray:
    x = state.astype(np.float64)
    return np.sqrt((x * x).sum(axis=(1, 2)))


def check_public_files(url: str) -> None:
    """The page is public, under a strict CSP, and has no inline code, no secret and no outside URL."""
    page = httpx.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == csp["script-src"] == csp["style-src"] == csp["connect-src"] == "'self'", csp
    assert csp["frame-ancestors"] == csp["object-src"] == "'none'" and "unsafe" not in str(csp)
    html = page.text
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/static/app.js" defer>']
    assert "<style" not in html and not re.search(r"\sstyle=", html) and not re.search(r"\son[a-z]+=", html)
    for name in ("app.js", "app.css", "icon.svg"):
        r = httpx.get(f"{url}/static/{name}", timeout=30)
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff", name
        assert r.headers["content-security-policy"] == page.headers["content-security-policy"]
        for body in (html, r.text):
            assert KEY not in body
            assert set(re.findall(r"https?://[^\s\"'`)]+", body)) <= {"http://www.w3.org/2000/svg"}, name
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401  # the API itself still needs the key


def check_csp_is_enforced(b: Browser, url: str) -> None:
    """The browser applies the page's CSP: an inline script put into the page does not run.

    (Why this test waits with selectors and ``expect``, never ``wait_for_function``: that one
    evals its predicate in the page, which the CSP forbids.)"""
    page = b.new_page()
    refused: list[str] = []
    page.on("console", lambda msg: refused.append(msg.text) if "Content Security Policy" in msg.text else None)
    page.goto(f"{url}/")
    page.evaluate("() => { const s = document.createElement('script'); s.textContent = 'window.inlineRan = 1';"
                  " document.head.append(s); }")
    assert page.evaluate("() => window.inlineRan") is None
    expect(page.locator("#key-dialog")).to_have_attribute("open", "")  # while app.js, from 'self', did run
    assert any("inline script" in text for text in refused), refused
    page.close()


def open_memory(page: Page, memory: str) -> None:
    page.fill("#memory-id", memory)
    page.press("#memory-id", "Enter")


def send(page: Page, text: str) -> tuple[str, int]:
    """Send a message; wait for its reply to end.  (reply text, SSE chunks it arrived in)."""
    n = page.locator("#messages li.assistant").count() + 1
    page.fill("#prompt", text)
    page.click("#send")
    li = page.locator("#messages li.assistant").nth(n - 1)
    expect(li).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    return li.text_content(), int(li.get_attribute("data-chunks"))


def wait_panel(page: Page, memory: str, turns: int | None) -> None:
    page.wait_for_selector(f'#panel[data-memory="{memory}"][data-turns="{"" if turns is None else turns}"]',
                           state="attached", timeout=WAIT_MS)


def bars(page: Page, chart: str) -> np.ndarray:
    return np.array(page.eval_on_selector_all(f"#{chart} rect", "rs => rs.map(r => Number(r.dataset.value))"))


def check_panel(page: Page, path: Path, memory: str, turns: int, before: np.ndarray | None) -> np.ndarray:
    """The panel shows the file's facts; its bars are numpy's norms of the file's state and of the
    difference to ``before`` (the file before the last turn; None: the zero state).  Returns the state."""
    wait_panel(page, memory, turns)
    mem = read_state_file(path)
    h = mem.header
    facts = page.eval_on_selector_all(
        "#facts dd", "ds => Object.fromEntries(ds.map(d => [d.id, [d.textContent, d.dataset.value ?? null]]))")
    assert h.turns == turns and facts["turns"] == [f"{turns:,}", str(turns)]
    assert facts["tokens"] == [f"{h.tokens_written:,}", str(h.tokens_written)]
    size = path.stat().st_size
    assert facts["bytes"][1] == str(size) and f"{size:,} bytes" in facts["bytes"][0]
    assert facts["adapter"][1] == h.adapter_fp.hex() and facts["base"][1] == h.model_fp.hex()
    assert facts["shape"][0].startswith(f"{h.n_layers} layers × {h.rows} × {h.rank}")
    np.testing.assert_allclose(bars(page, "norms-chart"), frobenius_per_layer(mem.state), rtol=1e-12)
    start = np.zeros(mem.state.shape) if before is None else before.astype(np.float64)
    np.testing.assert_allclose(bars(page, "change-chart"), frobenius_per_layer(mem.state - start), rtol=1e-12)
    return mem.state


def test_chat_page_in_a_real_browser(chat_files, talkative_files, tmp_path):
    exe = chromium()  # first: without a browser, fail at once
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"{KEY}\n")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with serve(chat_files, tmp_path / "mem", "--api-key-file", str(keyfile), "-n", "48") as srv, browser(exe) as b:
        check_public_files(srv.url)
        check_csp_is_enforced(b, srv.url)
        page = b.new_page(viewport={"width": 1280, "height": 800})
        problems = watch(page)
        page.goto(f"{srv.url}/")
        # the page's first API call got a 401: the key is asked once and kept in this tab's session storage
        page.wait_for_selector("#key-dialog[open]", timeout=WAIT_MS)
        page.fill("#key-input", KEY)
        page.click("#key-save")
        page.wait_for_selector("#model:has-text('tiny-chat')", timeout=WAIT_MS)
        assert page.evaluate("[sessionStorage.getItem('deltamem.apiKey'), localStorage.getItem('deltamem.apiKey')]") \
            == [KEY, None]
        first = page.input_value("#memory-id")  # a new visitor gets a fresh random id, with no file yet
        assert re.fullmatch(r"web-[0-9a-f]{8}", first)
        wait_panel(page, first, None)
        assert page.is_visible("#panel-empty") and not page.is_visible("#facts")

        # a message streams in, in several chunks: the reply any client gets (greedy; a new memory starts
        # from the zero state, as a stateless request does), and what was written into the memory
        open_memory(page, "ada")
        reply, chunks = send(page, "My name is Ada.")
        stream = chat(srv.client(KEY), [U("My name is Ada.")], stream=True, max_tokens=48)
        assert reply == "".join(c.choices[0].delta.content or "" for c in stream if c.choices) and reply
        assert chunks >= 2
        written = read_state_file(srv.path("ada")).transcript
        assert [(m["role"], m["content"]) for m in written] == [("user", "My name is Ada."), ("assistant", reply)]
        s1 = check_panel(page, srv.path("ada"), "ada", 1, None)
        send(page, "I keep bees.")
        check_panel(page, srv.path("ada"), "ada", 2, s1)

        # another memory id: an empty panel and chat, then its own numbers
        open_memory(page, "ben")
        wait_panel(page, "ben", None)
        assert page.locator("#messages li").count() == 0 and page.is_visible("#panel-empty")
        send(page, "Hello, I am Ben.")
        check_panel(page, srv.path("ben"), "ben", 1, None)
        open_memory(page, "ada")  # back: ada's panel, and this tab's thread with her
        check_panel(page, srv.path("ada"), "ada", 2, s1)
        assert page.locator("#messages li").count() == 4

        # a reload keeps the key (no dialog), the memory id, the thread, and the memory's counters
        page.reload()
        page.wait_for_selector("#model:has-text('tiny-chat')", timeout=WAIT_MS)
        assert page.locator("#key-dialog[open]").count() == 0 and page.input_value("#memory-id") == "ada"
        check_panel(page, srv.path("ada"), "ada", 2, s1)
        assert page.locator("#messages li").count() == 4
        page.screenshot(path=str(ARTIFACTS / "chat-page.png"))

        # Forget deletes the memory's file (after a confirm); New picks a fresh id
        open_memory(page, "ben")
        wait_panel(page, "ben", 1)
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#forget-memory")
        wait_panel(page, "ben", None)
        assert not srv.path("ben").exists() and srv.info("ben", headers={"x-api-key": KEY}).status_code == 404
        page.click("#new-memory")
        fresh = page.input_value("#memory-id")
        assert re.fullmatch(r"web-[0-9a-f]{8}", fresh) and fresh != first
        wait_panel(page, fresh, None)
        assert srv.path("ada").exists()
        assert not problems, problems

    # Stop, on a model whose replies run on for thousands of tokens (no API key on this server: no dialog)
    with serve(talkative_files, tmp_path / "long", "-np", "1", "-c", "4096", "-n", "3000") as srv, browser(exe) as b:
        prompt = next((p for p in LONG_PROMPTS
                       if chat(srv.client(), [U(p)], max_tokens=200).choices[0].finish_reason == "length"), None)
        assert prompt is not None, "no prompt makes this model talk long enough for the test"
        page = b.new_page(viewport={"width": 1280, "height": 800})
        problems = watch(page)
        page.goto(f"{srv.url}/")
        open_memory(page, "hal")
        wait_panel(page, "hal", None)
        page.fill("#prompt", prompt)
        page.click("#send")
        expect(page.locator("#messages li.assistant")).to_have_attribute("data-chunks", re.compile(r"[3-9]|\d\d+"),
                                                                       timeout=WAIT_MS)
        page.click("#stop")
        page.wait_for_selector('#messages li.assistant[data-state="stopped"]', timeout=WAIT_MS)
        shown = page.locator("#messages li.assistant").text_content()
        assert page.is_enabled("#send") and not page.is_enabled("#stop")
        wait_panel(page, "hal", 1)  # the cut turn was written and saved by the server, and the panel shows it
        mem = read_state_file(srv.path("hal"))
        saved = mem.transcript[1]["content"]
        assert shown and saved.startswith(shown)  # what the page showed, then at most what was in flight
        assert mem.header.tokens_written < 1500, mem.header.tokens_written  # far short of the 3000 asked for
        assert len(bars(page, "change-chart")) == mem.header.n_layers
        assert not page.locator("#key-dialog[open]").count() and not problems, problems
