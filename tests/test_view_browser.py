"""view.py in a real browser: headless Chromium must draw the segmentation (not a blank page).

Chromium's ``--screenshot`` alone shoots at the page's load event, before neuroglancer has fetched
any chunk (black panels), and ``--virtual-time-budget`` never expires on a neuroglancer page: the
viewer keeps a server-sent event stream open and virtual time waits for pending requests. So the
test drives the same headless Chromium over the DevTools protocol (tornado's websocket client,
already a neuroglancer dependency) and takes screenshots in real time until the segment colours
appear or a deadline passes. Skipped when /usr/bin/chromium is absent (Debian: apt-get install chromium).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="/usr/bin/chromium absent (Debian: apt-get install chromium)"
    ),
]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=800,600",
    "--enable-unsafe-swiftshader",  # software WebGL; without it Chromium warns it may refuse
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_tiny_volume(path: Path) -> None:
    """(8, 48, 48) raw padded by (2, 8, 8), 2x2 blocks of labels in each section, a split segmentation."""
    shape = (8, 48, 48)
    z, y, x = np.indices(shape)
    labels = (1 + (y // 24) * 2 + (x // 24) + 4 * (z // 4)).astype(np.uint32)
    boundary = (y % 24 == 0) | (x % 24 == 0)
    gt = np.where(boundary, 0, labels).astype(np.uint32)
    raw = np.where(boundary, 40, 200).astype(np.uint8)
    segmentation = labels.copy()
    segmentation[(labels == 1) & (x < 12)] = 50
    with h5py.File(path, "w") as handle:
        handle["volume"] = np.pad(raw, ((2, 2), (8, 8), (8, 8)), mode="edge")
        handle["labels"] = gt
        handle["segmentation"] = segmentation


def saturated_colours(png: bytes, min_pixels: int = 100) -> int:
    """Distinct saturated colours (5 bits per channel) covering >= ``min_pixels`` in the panels."""
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int32)
    panels = image[50:-40, 30:]  # skip the layer bar (coloured badges), the axis letters, the footer
    high, low = panels.max(-1), panels.min(-1)
    saturated = (high > 60) & (high - low > 0.35 * high)
    codes = ((panels[saturated] >> 3) * np.array([1024, 32, 1])).sum(-1)
    _, counts = np.unique(codes, return_counts=True)
    return int((counts >= min_pixels).sum())


async def screenshot_until_drawn(devtools_port: int, url: str, out: Path, deadline: float) -> int:
    """Opens ``url`` over DevTools; screenshots until segment colours show; returns their count."""
    from tornado.websocket import websocket_connect

    with urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json/list") as response:
        page = next(t for t in json.load(response) if t["type"] == "page")
    connection = await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=64 << 20)
    message_id = 0

    async def call(method: str, **params: object) -> dict:
        nonlocal message_id
        message_id += 1
        connection.write_message(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await connection.read_message())
            if reply.get("id") == message_id:
                return reply.get("result", {})

    await call("Page.navigate", url=url)
    colours = 0
    while time.monotonic() < deadline:
        await asyncio.sleep(2.0)
        png = base64.b64decode((await call("Page.captureScreenshot", format="png"))["data"])
        out.write_bytes(png)
        colours = saturated_colours(png)
        if colours >= 4:
            break
    connection.close()
    return colours


def start_chromium(profile: Path) -> tuple[subprocess.Popen, int]:
    """Headless Chromium with a fresh profile; (its process, its DevTools port)."""
    browser = subprocess.Popen(
        [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    active_port = profile / "DevToolsActivePort"
    start = time.monotonic()
    while not active_port.exists() and time.monotonic() - start < 30:
        time.sleep(0.2)
    assert active_port.exists(), "chromium did not open its DevTools port"
    return browser, int(active_port.read_text().split()[0])


def stop_all(browser: subprocess.Popen | None, viewer: subprocess.Popen, viewer_timeout: float) -> None:
    """Ends Chromium (its whole session) and view.py (Ctrl-C, then kill after ``viewer_timeout`` s)."""
    if browser is not None:
        os.killpg(browser.pid, signal.SIGTERM)
        browser.wait(timeout=30)
    viewer.send_signal(signal.SIGINT)
    try:
        viewer.wait(timeout=viewer_timeout)
    except subprocess.TimeoutExpired:
        viewer.kill()
        viewer.wait()


def test_view_draws_segmentation_in_headless_chromium(tmp_path: Path, repo_root: Path) -> None:
    volume = tmp_path / "tiny.hdf"
    write_tiny_volume(volume)
    port = free_port()
    viewer = subprocess.Popen(
        [
            sys.executable,
            str(repo_root / "view.py"),
            "--gt",
            str(volume),
            "--segmentation",
            str(volume),
            "--resolution",
            "30",
            "6",
            "6",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    browser = None
    try:
        url = viewer.stdout.readline().strip()
        assert url.startswith(f"http://127.0.0.1:{port}/v/"), (
            url,
            viewer.stderr.read() if viewer.poll() else "",
        )
        browser, devtools_port = start_chromium(tmp_path / "chromium-profile")
        shot = tmp_path / "shot.png"
        colours = asyncio.run(screenshot_until_drawn(devtools_port, url, shot, time.monotonic() + 60))
        print(f"screenshot {shot}: {colours} distinct saturated colours")
        assert colours >= 4, f"segmentation not drawn: {colours} saturated colours in {shot}"
    finally:
        stop_all(browser, viewer, viewer_timeout=10)
