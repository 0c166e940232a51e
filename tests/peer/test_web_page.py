"""The web page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium) against the API and real span servers on
loopback. Screenshots of both pages are kept under ``test-artifacts/`` (git-ignored).

The browser runs in a worker thread (selenium blocks) while the servers and the API
run in the test's trio loop.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import trio

from peer.api import Swarm
from peer.http import ApiModel, SwarmApi, serve_http

from peer_helpers import start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

if not (CHROMIUM and CHROMEDRIVER):
    reason = ("SKIPPED LOUDLY: no headless Chromium here (chromium and chromium-driver from Debian); "
              "`make setup` installs them when run as root, as CI does")
    if os.geteuid() == 0 or os.environ.get("CI"):
        raise RuntimeError(reason.replace("SKIPPED LOUDLY: ", "") + ": as root (or in CI) they must be installed")
    pytest.skip(reason, allow_module_level=True)

# Flags that work in this sandbox: no GPU, no sandbox (root), nothing phoning home.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900"]


def open_browser(profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    # An explicit driver path: selenium's manager never looks for (or downloads) one.
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def wait_until(driver, condition, timeout=60.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


async def test_chat_streams_tokens_and_the_swarm_view_names_every_server(chat_model):
    ARTIFACTS.mkdir(exist_ok=True)
    async with trio.open_nursery() as nursery:
        first = await start_server(nursery, chat_model, (0, 2))
        second = await start_server(nursery, chat_model, (0, 2), bootstrap=[first.address])
        third = await start_server(nursery, chat_model, (2, 4), bootstrap=[first.address])
        nodes = [first, second, third]
        swarm = await Swarm.connect(nursery, bootstrap=[first.address], model=chat_model, audit=0)
        api = SwarmApi([ApiModel("tiny-chat", swarm)])
        url = await nursery.start(functools.partial(serve_http, api.app, port=0))
        token = trio.lowlevel.current_trio_token()
        seen: dict[str, object] = {}

        def browse():
            from selenium.webdriver.common.by import By
            from selenium.webdriver.common.keys import Keys

            with tempfile.TemporaryDirectory(prefix="swarm-peer-chromium-") as profile:
                driver = open_browser(profile)
                try:
                    driver.get(url)
                    wait_until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
                    for field, value in [("temperature", "0.8"), ("top_p", "0.9"), ("seed", "3"), ("max_tokens", "60")]:
                        driver.find_element(By.ID, field).clear()
                        driver.find_element(By.ID, field).send_keys(value)
                    box = driver.find_element(By.ID, "chat-input")
                    box.send_keys("Write a poem about the sea.")
                    box.send_keys(Keys.ENTER)
                    answer = lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant")  # noqa: E731
                    # Tokens appear while the answer still streams ...
                    wait_until(driver, lambda d: answer(d).get_attribute("data-state") == "streaming"
                               and answer(d).find_element(By.CSS_SELECTOR, ".text").text.strip())
                    seen["partial"] = answer(driver).find_element(By.CSS_SELECTOR, ".text").text
                    seen["partial_server_sessions"] = trio.from_thread.run_sync(
                        lambda: sum(n.server.open_sessions for n in nodes), trio_token=token)
                    # ... and the answer ends with its route.
                    wait_until(driver, lambda d: answer(d).get_attribute("data-state") == "done")
                    seen["text"] = answer(driver).find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")
                    seen["route"] = answer(driver).find_element(By.CSS_SELECTOR, ".route").text
                    driver.save_screenshot(str(ARTIFACTS / "web-chat.png"))

                    # The stop button ends a long answer early.
                    driver.find_element(By.ID, "max_tokens").clear()
                    driver.find_element(By.ID, "max_tokens").send_keys("300")
                    box.send_keys("Tell me a very long story.")
                    box.send_keys(Keys.ENTER)
                    second_answer = lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[1]  # noqa: E731
                    wait_until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
                               and second_answer(d).find_element(By.CSS_SELECTOR, ".text").text.strip())
                    driver.find_element(By.ID, "stop").click()
                    wait_until(driver, lambda d: second_answer(d).get_attribute("data-state") == "stopped")

                    driver.get(url + "#swarm")
                    wait_until(driver, lambda d: d.find_element(By.ID, "page-swarm").get_attribute("data-loaded"))
                    # One script reads the whole view: the page re-renders it every 2 s, and
                    # elements found one call before a re-render are stale in the next.
                    seen.update(driver.execute_script("""
                        const rows = [...document.querySelectorAll("#coverage tr.server")];
                        return {rows: rows.map(r => r.getAttribute("data-peer")),
                                names: rows.map(r => r.querySelector("td.name").innerText),
                                served_cells: document.querySelectorAll("#coverage td.served").length,
                                gaps: document.getElementById("gaps").innerText,
                                servers_table: document.getElementById("servers").innerText};
                    """))
                    driver.save_screenshot(str(ARTIFACTS / "web-swarm.png"))
                finally:
                    driver.quit()

        await trio.to_thread.run_sync(browse)
        assert seen["partial"]
        assert seen["partial_server_sessions"] >= 2  # seen mid-stream, sessions open
        reference = await swarm.generate([{"role": "user", "content": "Write a poem about the sea."}],
                                         max_new_tokens=60, temperature=0.8, top_p=0.9, seed=3)
        assert seen["text"] == reference.text
        assert seen["route"].startswith("route: ")
        assert "[0:2]" in seen["route"]
        assert "[2:4]" in seen["route"]
        peers = sorted(n.identity.peer_id.hex() for n in nodes)
        assert sorted(seen["rows"]) == peers
        for node in nodes:  # every server is named on the coverage map, with its address
            assert any(node.identity.peer_id.hex()[:12] in name and node.address in name for name in seen["names"])
        assert seen["served_cells"] == 2 + 2 + 2
        assert "Every block is served" in seen["gaps"]
        assert (ARTIFACTS / "web-chat.png").stat().st_size > 0
        assert (ARTIFACTS / "web-swarm.png").stat().st_size > 0
        # The stopped answer's sessions were freed.
        with trio.fail_after(30):
            while sum(n.server.open_sessions for n in nodes):
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


async def test_the_swarm_view_highlights_gaps(chat_model):
    async with trio.open_nursery() as nursery:
        node = await start_server(nursery, chat_model, (1, 3))
        swarm = await Swarm.connect(nursery, bootstrap=[node.address], model=chat_model, audit=0)
        api = SwarmApi([ApiModel("tiny-chat", swarm)])
        url = await nursery.start(functools.partial(serve_http, api.app, port=0))
        seen = {}

        def browse():
            from selenium.webdriver.common.by import By

            with tempfile.TemporaryDirectory(prefix="swarm-peer-chromium-") as profile:
                driver = open_browser(profile)
                try:
                    driver.get(url + "#swarm")
                    wait_until(driver, lambda d: d.find_element(By.ID, "page-swarm").get_attribute("data-loaded"))
                    seen.update(driver.execute_script("""
                        return {gaps: document.getElementById("gaps").innerText,
                                gap_headers: [...document.querySelectorAll("#coverage th.gap")].map(h => h.innerText)};
                    """))  # in one script: the view re-renders every 2 s (see the test above)
                    driver.save_screenshot(str(ARTIFACTS / "web-swarm-gaps.png"))
                finally:
                    driver.quit()

        ARTIFACTS.mkdir(exist_ok=True)
        await trio.to_thread.run_sync(browse)
        assert seen["gaps"] == "Gaps: blocks 0..0, 3..3 are not served."
        assert seen["gap_headers"] == ["0", "3"]
        nursery.cancel_scope.cancel()
