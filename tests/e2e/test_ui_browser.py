"""The live page in a real browser: headless Debian Chromium, driven by Playwright, over the farm.

Skipped where ``/usr/bin/chromium`` or the ``playwright`` package is missing (Playwright's own
browser download is not used). ``OLLAMUX_UI_SCREENSHOTS=DIR`` also saves the page at phone and
desktop width as ``DIR/ui.png`` and ``DIR/ui-phone.png`` (how ``docs/ui.png`` was made).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path

import pytest

from tests.integration.farm import farm

CHROMIUM = Path("/usr/bin/chromium")
MODEL = "llama3.2:1b"
OTHER = "qwen2.5:7b"
WAIT_MS = 15_000
"""Bound on each wait for the page to show something (it polls every 1.5 s)."""
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
"""What Chromium needs on a machine without a screen or outside network (and as root)."""

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="needs the playwright Python package (pip install playwright)",
    ),
]


async def test_the_page_shows_the_gpus_then_the_chat_and_why_it_went_there(
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright, expect

    shots = os.environ.get("OLLAMUX_UI_SCREENSHOTS")
    async with farm(tmp_path) as box, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 390, "height": 844})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(box.url + "/proxy/ui")

            cards = page.locator("#instances article")
            await expect(cards).to_have_count(4, timeout=WAIT_MS)
            for i in range(4):
                await expect(page.locator("#instances")).to_contain_text(
                    f"GPU {i} · emu{i}", timeout=WAIT_MS
                )
            await expect(page.locator("#summary")).to_contain_text("4/4 instances up")
            await expect(page.locator("#recent tbody tr")).to_have_count(0)

            reply = await box.ollama().chat(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                options={"num_predict": 4},
            )
            assert reply.message.content
            row = page.locator("#recent tbody tr").first
            await expect(row).to_contain_text(MODEL, timeout=WAIT_MS)
            served_by = next(name for name, models in box.loaded().items() if MODEL in models)
            await expect(row).to_contain_text(served_by)
            await expect(row).to_contain_text("200")
            card = cards.filter(has_text=served_by).first
            await expect(card.locator(".models")).to_contain_text(MODEL, timeout=WAIT_MS)
            why = (await row.locator("td.why").inner_text()).strip()
            assert why and why != "-"  # the reason the router gave
            assert not errors, errors  # no CSP violation, no script error

            # The phone width shows every card without scrolling sideways.
            width = await page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390
            if shots:  # a busier box makes a better picture
                client = box.ollama()
                await asyncio.gather(
                    *(
                        client.chat(model=m, messages=[{"role": "user", "content": "hi"}])
                        for m in (MODEL, OTHER, "gemma3:12b") * 3
                    )
                )
                await page.wait_for_timeout(2000)
                await page.screenshot(path=str(Path(shots) / "ui-phone.png"), full_page=True)
                await page.set_viewport_size({"width": 1280, "height": 900})
                await page.wait_for_timeout(300)
                await page.screenshot(path=str(Path(shots) / "ui.png"), full_page=True)
        finally:
            await browser.close()


async def test_with_protect_status_the_page_asks_for_the_key(tmp_path: Path) -> None:
    from playwright.async_api import async_playwright, expect

    from proxy.keystore import add_key

    keys = tmp_path / "keys.yaml"
    key = add_key(keys, "ops")
    auth = {"keys_file": str(keys), "protect_status": True}
    async with farm(tmp_path, auth=auth) as box, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = await browser.new_page()
            await page.goto(box.url + "/proxy/ui")
            await expect(page.locator("#keyform")).to_be_visible(timeout=WAIT_MS)
            await page.fill("#key", "not-a-key")
            await page.press("#key", "Enter")
            await expect(page.locator("#problem")).to_contain_text("refused", timeout=WAIT_MS)
            await page.fill("#key", key)
            await page.click("#keyform button")
            await expect(page.locator("#instances article")).to_have_count(4, timeout=WAIT_MS)
            await expect(page.locator("#keyform")).to_be_hidden()
        finally:
            await browser.close()


async def test_servers_on_other_hosts_show_their_estimate_and_what_they_lack(
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright, expect

    async with (
        farm(tmp_path, gpus=(24,), stores="separate", launcher="external") as box,
        async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = await browser.new_page()
            await page.goto(box.url + "/proxy/ui")
            card = page.locator("#instances article").first
            await expect(card).to_contain_text("no GPU reading", timeout=WAIT_MS)
            lacks = card.locator(".line").filter(has_text="lacks")
            await expect(lacks).to_contain_text("gpu memory")
            await box.ollama().chat(model=MODEL, messages=[{"role": "user", "content": "hi"}])
            # once it held a model, its memory is estimated from the most it held (learned)
            await expect(card).to_contain_text("(learned)", timeout=WAIT_MS)
            await expect(lacks).to_contain_text("gpu memory readings (learned)")
        finally:
            await browser.close()
