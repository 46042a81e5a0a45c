"""Meshes in a real browser: view.py shows a layer of ``python -m melecole.mesh`` and neuroglancer loads its meshes.

Headless Chromium is driven over the DevTools protocol, as in test_view_browser.py. Neuroglancer fetches chunks
and meshes in a web worker, so the test attaches to the page's workers (``Target.setAutoAttach``, the workers
paused until their network events are enabled) and records every response. It passes when every manifest and
every fragment file of the layer came back 200, the mesh layer's fragments all reached the GPU (neuroglancer's
own chunk state, read from the page), the segmentation layer's source loaded without error, and the page threw
no exception. Skipped when /usr/bin/chromium is absent (Debian: apt-get install chromium).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_view_browser import CHROMIUM, free_port, start_chromium, stop_all

from melecole.mesh import mesh_segmentation

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium absent (Debian: apt-get install chromium)"),
]

# In the page: per segmentation layer, whether its sources loaded, and for its mesh render layer (found by
# shape: a source with a fragmentSource) the manifests and the states of the fragment chunks (0 = in GPU memory).
PAGE_STATE = """JSON.stringify(viewer.layerManager.managedLayers.map(managed => {
  const layer = managed.layer;
  const sources = (layer && layer.dataSources || []).map(d => d.loadState === undefined ? 'loading'
      : (d.loadState.error ? 'error: ' + d.loadState.error.message : 'ok'));
  const meshes = (layer && layer.renderLayers || []).filter(r => r.source && r.source.fragmentSource).map(r => ({
      manifests: r.source.chunks.size,
      fragments: Array.from(r.source.fragmentSource.chunks.values()).map(c => c.state)}));
  return {name: managed.name, sources, meshes};
}))"""


class DevTools:
    """One DevTools websocket: commands (with a session id for workers) and every event, read continuously."""

    def __init__(self, connection: object):
        self.connection = connection
        self.events: list[dict] = []
        self.replies: dict[int, asyncio.Future] = {}
        self.next_id = 0
        self.reader = asyncio.ensure_future(self.read())

    async def read(self) -> None:
        while True:
            text = await self.connection.read_message()
            if text is None:
                return
            message = json.loads(text)
            if "id" in message and message["id"] in self.replies:
                self.replies.pop(message["id"]).set_result(message.get("result", {}))
                continue
            self.events.append(message)
            if message.get("method") == "Target.attachedToTarget":  # a worker, paused until we listen
                session = message["params"]["sessionId"]
                self.send("Network.enable", session)
                self.send("Runtime.enable", session)
                self.send("Runtime.runIfWaitingForDebugger", session)

    def send(self, method: str, session: str | None = None, **params: object) -> asyncio.Future:
        self.next_id += 1
        future = asyncio.get_running_loop().create_future()
        self.replies[self.next_id] = future
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.connection.write_message(json.dumps(message))
        return future

    async def evaluate(self, expression: str) -> object:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return json.loads(result.get("result", {}).get("value") or "null")


async def load_page(devtools_port: int, url: str, expected_fragments: int, deadline: float) -> tuple[list, list]:
    """Opens ``url``; polls the page until the mesh layer's fragments are all on the GPU or ``deadline``.

    Returns:
        (the last page state, every DevTools event).
    """
    from tornado.websocket import websocket_connect

    with urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json/list") as response:
        page = next(t for t in json.load(response) if t["type"] == "page")
    connection = await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=64 << 20)
    tools = DevTools(connection)
    for method in ("Network.enable", "Runtime.enable", "Log.enable"):
        await tools.send(method)
    await tools.send("Target.setAutoAttach", autoAttach=True, waitForDebuggerOnStart=True, flatten=True)
    await tools.send("Page.navigate", url=url)
    state: list = []
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        state = await tools.evaluate(f"typeof viewer === 'undefined' ? null : {PAGE_STATE}") or []
        meshes = [mesh for layer in state for mesh in layer["meshes"]]
        if meshes and len(meshes[0]["fragments"]) == expected_fragments and not any(meshes[0]["fragments"]):
            break
    connection.close()
    tools.reader.cancel()
    return state, tools.events


def responses(events: list[dict], prefix: str) -> dict[str, int]:
    """{path after ``prefix``: HTTP status} of the responses to URLs under ``prefix`` (page and workers)."""
    found = {}
    for event in events:
        if event.get("method") == "Network.responseReceived":
            response = event["params"]["response"]
            if response["url"].startswith(prefix):
                found[response["url"][len(prefix) :]] = response["status"]
    return found


def page_errors(events: list[dict]) -> list[str]:
    """Exceptions, console errors and failed requests (but the viewer's missing favicon)."""
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(json.dumps(params["exceptionDetails"])[:300])
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            errors.append(json.dumps(params.get("args"))[:300])
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            if "favicon.ico" not in params["entry"].get("url", ""):
                errors.append(params["entry"]["text"])
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            errors.append(f"request failed: {params.get('errorText')}")
    return errors


def test_neuroglancer_loads_the_mesh_layer_in_headless_chromium(tmp_path: Path, repo_root: Path) -> None:
    z, y, x = np.indices((8, 48, 48))
    labels = (1 + (y // 24) * 2 + (x // 24)).astype(np.uint32)
    with h5py.File(tmp_path / "seg.hdf", "w") as handle:
        handle["labels"] = labels
        handle["segmentation"] = labels
    layer = tmp_path / "meshes"
    mesh_segmentation(str(tmp_path / "seg.hdf"), layer, resolution=(30, 6, 6), block_shape=(8, 32, 32), workers=1)
    files = sorted(path.name for path in (layer / "mesh").iterdir() if path.name != "info")
    fragments = [name for name in files if name.count(":") == 2]
    assert len(files) == 4 + len(fragments) and len(fragments) == 9  # 4 manifests; labels cross 1, 2 or 4 blocks
    port = free_port()
    command = [sys.executable, str(repo_root / "view.py"), "--gt", f"{tmp_path / 'seg.hdf'}:labels"]
    viewer = subprocess.Popen(
        [*command, "--segmentation", str(layer), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    browser = None
    try:
        url = viewer.stdout.readline().strip()
        assert url.startswith(f"http://127.0.0.1:{port}/v/"), (url, viewer.stderr.read() if viewer.poll() else "")
        browser, devtools_port = start_chromium(tmp_path / "chromium-profile")
        state, events = asyncio.run(load_page(devtools_port, url, len(fragments), time.monotonic() + 40))
    finally:
        stop_all(browser, viewer, viewer_timeout=15)
    segmentation = next(layer for layer in state if layer["name"] == "segmentation")
    assert segmentation["sources"] == ["ok"], segmentation
    served = responses(events, "http://")
    base = "http://" + next(address.rsplit("/mesh/", 1)[0] for address in served if address.endswith("/mesh/info"))
    fetched = responses(events, base + "/mesh/")
    assert {name: fetched.get(name) for name in files} == dict.fromkeys(files, 200), fetched
    assert segmentation["meshes"] == [{"manifests": 4, "fragments": [0] * len(fragments)}], segmentation
    assert not page_errors(events), page_errors(events)
