"""The dashboard's live feed: one producer task, many WebSocket subscribers.

The producer (in the gateway's nursery) takes a reading every ``dashboard.interval_s``; while
anyone watches, it encodes one snapshot and offers the same bytes to every subscriber's bounded
queue without waiting. A subscriber whose queue is full (a browser that stopped reading) is
dropped: its queue is closed and its socket task ends, so a slow viewer can never hold up the
producer, the others or the gateway.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec
import trio

from .snapshot import SnapshotBuilder

if TYPE_CHECKING:
    from ..config import DashboardConfig
    from ..gateway import Gateway
    from ..http.websocket import WebSocket

log = logging.getLogger("lmgw.dashboard")
#: snapshots a subscriber may have queued before it counts as too slow
QUEUE = 4
_encode = msgspec.json.Encoder().encode


class Feed:
    def __init__(self, gateway: Gateway, cfg: DashboardConfig) -> None:
        self.builder = SnapshotBuilder(gateway, cfg.interval_s, cfg.window_s)
        self.interval_s = cfg.interval_s
        self.max_subscribers = cfg.max_subscribers
        self._subscribers: set[trio.MemorySendChannel[str]] = set()
        #: subscribers dropped for being too slow (since start)
        self.dropped = 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def snapshot_text(self) -> str:
        return _encode(self.builder.snapshot()).decode()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The producer: a reading per interval, a snapshot per interval while watched."""
        task_status.started()
        next_tick = trio.current_time()
        while True:
            self.builder.tick(trio.current_time())
            if self._subscribers:
                self.publish(self.snapshot_text())
            next_tick += self.interval_s
            now = trio.current_time()
            if next_tick < now:  # fell behind (a long pause): no burst of catch-up ticks
                next_tick = now + self.interval_s
            await trio.sleep_until(next_tick)

    def publish(self, text: str) -> None:
        """Offer ``text`` to every subscriber; drop the ones that cannot take it now."""
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(text)
            except trio.WouldBlock:
                self._subscribers.discard(channel)
                channel.close()
                self.dropped += 1
                log.info("dashboard: a viewer fell %d snapshots behind; dropped", QUEUE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(channel)

    def subscribe(self) -> trio.MemoryReceiveChannel[str] | None:
        """A queue of snapshots, the current one already in it; None when full up."""
        if len(self._subscribers) >= self.max_subscribers:
            return None
        send, receive = trio.open_memory_channel[str](QUEUE)
        send.send_nowait(self.snapshot_text())
        self._subscribers.add(send)
        return receive

    async def serve(self, ws: WebSocket) -> None:
        """Stream snapshots to one WebSocket until either side stops."""
        queue = self.subscribe()
        if queue is None:
            await ws.close(1013, "too many dashboard viewers; try again later")
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_until_closed, ws, nursery.cancel_scope)
                async with queue:
                    async for text in queue:
                        await ws.send_text(text)
                # the producer closed our queue: too slow
                await ws.close(1008, "too slow: dropped by the gateway")
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await ws.close()


async def _until_closed(ws: WebSocket, scope: trio.CancelScope) -> None:
    """Read (and discard) what the browser sends, answering pings; cancel when it leaves."""
    while await ws.receive() is not None:
        pass
    scope.cancel()
