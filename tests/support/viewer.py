"""A subscriber in its own process (for SIGSTOP tests): joins with a token and prints how many
video frames it has decoded from a participant's camera, every 100 ms.

    python -m tests.support.viewer <address> <token> <participant_id>
"""

from __future__ import annotations

import asyncio
import sys

from spaces.sdk.client import Space


async def main(address: str, token: str, watched: str) -> None:
    space = Space(token, address)
    await space.join()
    while True:
        track = space.remote_track(watched, "camera")
        print(f"frames {track.frames_received if track else 0}", flush=True)
        await asyncio.sleep(0.1)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
