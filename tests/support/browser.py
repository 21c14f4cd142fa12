"""Real headless Chromium for browser tests: Debian's /usr/bin/chromium driven by Playwright
(the PyPI package, which never downloads a browser here), with fake devices and loopback-only
ICE. Each page gets its own browser context (its own devices and storage).

``harness.js`` is injected into every page: a coloured synthetic camera per page (so receivers
can tell senders apart), frame counting with ``requestVideoFrameCallback``, and colour sampling
of received video.

The unmodified ``@mux/spaces-web`` is installed from npm at test time (``make test`` runs the
install outside the private network namespace, into ``.cache/``, never committed); its
self-contained ``dist/mux-spaces.js`` is injected into the page as any of its users would load
it.

Chromium only ever runs inside the tests' private network namespace (``tests/in-netns``, which
``make test``, ``make test-bench`` and ``make bench`` use): there loopback is the only
interface, so ICE can gather nothing but 127.0.0.1, and the browser tests assert exactly that
(``harness.localCandidateAddresses()``). Anywhere else ``chromium()`` refuses to start.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("SPACES_CHROMIUM", "/usr/bin/chromium")
HARNESS = Path(__file__).with_name("harness.js")
MUX_SDK_VERSION = "1.2.0"
MUX_SDK_DIR = ROOT / ".cache" / "mux-spaces-web"
MUX_SDK_JS = MUX_SDK_DIR / "node_modules" / "@mux" / "spaces-web" / "dist" / "mux-spaces.js"

CHROMIUM_ARGS = [
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]


def mux_sdk() -> Path:
    """The path of the unmodified Mux web SDK, installing it from npm when it is missing."""
    if not MUX_SDK_JS.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is needed to install @mux/spaces-web for the browser tests")
        MUX_SDK_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                npm,
                "install",
                "--no-audit",
                "--no-fund",
                "--no-save",
                "--prefix",
                str(MUX_SDK_DIR),
                f"@mux/spaces-web@{MUX_SDK_VERSION}",
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return MUX_SDK_JS


class NotInTestNetwork(RuntimeError):
    """Chromium was asked for outside the tests' loopback-only network namespace."""


def require_test_network() -> None:
    """Raise unless this process runs in the namespace ``tests/in-netns`` made: it says so in
    ``SPACES_IN_NETNS=1`` (unset when it fell back to the host's network, or with
    ``SPACES_NO_NETNS=1``), and loopback is the only interface (so a stray variable on the
    host's network is caught too)."""
    others = sorted(name for _, name in socket.if_nameindex() if name != "lo")
    if os.environ.get("SPACES_IN_NETNS") != "1" or others:
        where = f"interfaces besides lo: {', '.join(others)}" if others else "SPACES_IN_NETNS unset"
        raise NotInTestNetwork(
            "browser tests run only in the tests' private network namespace, where ICE can "
            f"gather nothing but 127.0.0.1 ({where}): run them through tests/in-netns, e.g. "
            "`tests/in-netns .venv/bin/python -m pytest tests/test_web_client.py` or `make test`"
        )


@asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    require_test_network()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


class Page:
    """One browser participant: a page in its own context, at ``origin`` (the signaling
    service, so that pages, the SDK and the WebSocket share one origin), with the harness."""

    def __init__(self, page: Any, context: Any, name: str) -> None:
        self.page = page
        self.context = context
        self.name = name
        self.console: list[str] = []
        page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}"))
        page.on("pageerror", lambda exc: self.console.append(f"pageerror: {exc}"))

    @classmethod
    async def open(
        cls,
        browser: Any,
        origin: str,
        name: str,
        color: tuple[int, int, int],
        path: str = "/healthz",
    ) -> Page:
        context = await browser.new_context()
        page = await context.new_page()
        self = cls(page, context, name)
        await page.goto(origin.rstrip("/") + path)
        await page.add_script_tag(path=str(HARNESS))
        await page.evaluate("([r, g, b]) => harness.setColor(r, g, b)", list(color))
        return self

    async def load_mux_sdk(self, backend: str) -> None:
        await self.page.evaluate("url => { window.MUX_SPACES_BACKEND_URL = url; }", backend)
        await self.page.add_script_tag(path=str(mux_sdk()))

    async def js(self, expression: str, arg: Any = None) -> Any:
        return await self.page.evaluate(expression, arg)

    async def local_candidate_addresses(self) -> set[str]:
        """The addresses of the local ICE candidates in the getStats() of the page's open peer
        connections (with a marker for a connection that has none, or for no connection)."""
        addresses: list[str] = await self.js("() => harness.localCandidateAddresses()")
        return set(addresses)

    async def close(self) -> None:
        await self.context.close()

    def log(self) -> str:
        return "\n".join(self.console[-80:])
