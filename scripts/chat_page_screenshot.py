"""Take the chat page screenshot of docs/server.md (docs/img/chat-page.png) with the default model.

    python scripts/chat_page_screenshot.py [--out docs/img/chat-page.png]

Starts `deltamem-edge serve` (the embedded SmolLM2-135M and its shipped adapter, greedy) on a free
port with a throw-away memory directory, has a short conversation through the page in Debian's
headless chromium (Playwright, ``executable_path``; nothing downloaded) and saves the screenshot.
The CI test (tests/test_chat_page.py) takes its own screenshot on the tiny random test model.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

TURNS = ("Hi! My name is Ines and I keep bees in Porto.", "What should I plant for my bees this spring?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs/img/chat-page.png")
    ap.add_argument("--max-tokens", default="80")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or sys.exit("needs Debian's chromium: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as memdir:
        proc = subprocess.Popen([sys.executable, "-m", "deltamem_edge", "serve", "--port", "0", "--temp", "0",
                                 "-n", args.max_tokens, "-np", "1", "-c", "2048", "--memory-dir", memdir],
                                stderr=subprocess.PIPE, text=True)
        try:
            for line in proc.stderr:
                if line.startswith("listening on "):
                    url = line.split()[-1]
                    break
            else:
                sys.exit("the server did not start")
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium)
                page = browser.new_page(viewport={"width": 1180, "height": 720}, device_scale_factor=1)
                page.goto(f"{url}/")
                page.fill("#memory-id", "ines")
                page.press("#memory-id", "Enter")
                for n, text in enumerate(TURNS, 1):
                    page.fill("#prompt", text)
                    page.click("#send")
                    page.wait_for_selector(f'#panel[data-memory="ines"][data-turns="{n}"]', state="attached",
                                           timeout=120_000)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out))
                browser.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    print(f"screenshot: {args.out}")


if __name__ == "__main__":
    main()
