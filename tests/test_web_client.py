"""Our browser client (``web/spaces.js``, served at ``/sdk/spaces.js``) in real headless
Chromium against a real single-process server: media between pages and with a Python SDK
participant, every event the protocol carries, uniqueness, reconnect, kick and delete.

One browser and one server for the module (each test has its own space); every page is its own
browser context with a synthetic camera of its own colour (tests/support/harness.js), and
``tests/support/webapp.js`` records what the page's client saw."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from spaces.server import SpacesServer
from tests.support.browser import Page, chromium
from tests.support.system import Admin, Tenant, eventually, start_server, web_config

pytestmark = pytest.mark.asyncio(loop_scope="module")

WEBAPP = Path(__file__).parent / "support" / "webapp.js"
RED = (220, 40, 40)
GREEN = (40, 200, 40)
BLUE = (40, 40, 220)
COLOR_TOLERANCE = 60


def close_to(color: list[int] | None, expected: tuple[int, int, int]) -> bool:
    return color is not None and all(
        abs(a - b) <= COLOR_TOLERANCE for a, b in zip(color, expected, strict=True)
    )


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser() -> AsyncIterator[Any]:
    async with chromium() as b:
        yield b


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> AsyncIterator[SpacesServer]:
    s = await start_server(web_config())
    yield s
    await s.stop()


class World:
    """One test's space, its token signer, and the pages it opened (closed at the end)."""

    def __init__(self, server: SpacesServer, browser: Any, admin: Admin, tenant: Tenant) -> None:
        self.server = server
        self.browser = browser
        self.admin = admin
        self.tenant = tenant
        self.space_id = ""
        self.pages: list[Page] = []

    @property
    def origin(self) -> str:
        return str(self.server.signal.url)

    async def page(self, name: str, color: tuple[int, int, int] = (128, 128, 128)) -> Page:
        page = await Page.open(self.browser, self.origin, name, color)
        await page.page.add_script_tag(path=str(WEBAPP))
        self.pages.append(page)
        return page

    async def joined(
        self,
        name: str,
        color: tuple[int, int, int] = (128, 128, 128),
        *,
        role: str = "publisher",
        publish: bool = True,
        **options: Any,
    ) -> Page:
        """A page whose client joined as participant ``name`` (and published camera and
        microphone unless told otherwise)."""
        page = await self.page(name, color)
        token = self.tenant.token(self.space_id, name, role=role)
        result = await page.js("([t, o]) => app.join(t, o)", [token, options])
        assert result.get("participantId") == name, (result, page.log())
        if publish:
            published = await page.js("() => app.publish({audio: true, video: true})")
            assert isinstance(published, list), (published, page.log())
        return page


@pytest_asyncio.fixture(loop_scope="module")
async def world(server: SpacesServer, browser: Any) -> AsyncIterator[World]:
    admin = Admin(server.address)
    w = World(server, browser, admin, Tenant(await admin.create_key()))
    w.space_id = await admin.create_space()
    yield w
    for page in w.pages:
        await page.close()
    await admin.close()


async def frames(page: Page) -> dict[str, int]:
    result: dict[str, int] = await page.js("() => app.frames()")
    return result


async def video(page: Page) -> dict[str, Any]:
    result: dict[str, Any] = await page.js("() => app.video()")
    return result


async def until_frames(page: Page, key: str, count: int, timeout: float = 20.0) -> None:
    async def check() -> bool:
        return (await frames(page)).get(key, 0) >= count

    try:
        await eventually(check, timeout=timeout, interval=0.2)
    except AssertionError:
        raise AssertionError(f"{page.name}: {key} {await frames(page)}\n{page.log()}") from None


# --- media ----------------------------------------------------------------------------------


async def test_three_pages_each_decode_the_other_two_with_the_right_colours(world: World) -> None:
    colors = {"red": RED, "green": GREEN, "blue": BLUE}
    pages = {name: await world.joined(name, color) for name, color in colors.items()}
    for viewer, page in pages.items():
        for sender in colors:
            if sender != viewer:
                await until_frames(page, f"{sender}/camera", 30)
    for viewer, page in pages.items():
        seen = await video(page)
        assert sorted(seen) == sorted(f"{s}/camera" for s in colors if s != viewer)
        for sender, expected in colors.items():
            if sender == viewer:
                continue
            entry = seen[f"{sender}/camera"]
            assert entry["frames"] >= 30
            # Every presented frame is the sender's colour: never another page's.
            assert entry["colors"], (viewer, sender)
            wrong = [c for c in entry["colors"] if not close_to(c, expected)]
            assert not wrong, (viewer, sender, wrong[:5], len(entry["colors"]))
