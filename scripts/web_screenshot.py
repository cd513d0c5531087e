"""Screenshot the web chat page of a trained run, the way a visitor sees it (docs/web_screenshot.png).

    python scripts/web_screenshot.py RUN_DIR docs/web_screenshot.png \
        --message "Good morning, Lyra!" --message "I'm a bit tired today."

Starts `python -m lyra.web run_dir=RUN_DIR` on a free port (greedy decoding, so the picture is
reproducible), drives Debian's headless Chromium through Playwright: sends the first message, turns
on "Compare with the base model", sends the others, waits for every reply, and saves a full-page
screenshot. Needs `pip install -e '.[dev]'` and `/usr/bin/chromium`.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_served(url: str, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"lyra.web exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"lyra.web did not serve {url} within {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--message", action="append", required=True, help="sent in order; the base pane joins at the 2nd")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()

    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([sys.executable, "-m", "lyra.web", f"run_dir={args.run_dir.resolve()}",
                               f"server_port={port}", "generation.temperature=0",
                               f"generation.max_new_tokens={args.max_new_tokens}"],
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:
        wait_until_served(url, server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            bot = page.locator("#lyra-chat [data-testid='bot']")
            base_bot = page.locator("#lyra-base-chat [data-testid='bot']")
            for number, message in enumerate(args.message, start=1):
                if number == 2:
                    page.locator("#lyra-compare input").check()
                page.locator("#lyra-input textarea").fill(message)
                page.locator("#lyra-send").click()
                expect(bot).to_have_count(number, timeout=300_000)
                expect(page.locator("#lyra-input textarea")).to_be_editable(timeout=300_000)  # reply finished
                if number >= 2:
                    expect(base_bot).to_have_count(number - 1, timeout=300_000)
            page.wait_for_timeout(1000)  # the last streamed chunk renders
            args.output.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.output), full_page=True)
            print("\n".join(f"reply: {text}" for text in bot.all_inner_texts()))
            print("\n".join(f"base:  {text}" for text in base_bot.all_inner_texts()))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
