"""GET /api/stream: job transitions as server-sent events, for the dashboard and `jobs watch`.

One Redis subscription per web process fans out to every open stream, so a dozen open dashboards
cost one Redis connection, not a dozen.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.jobs import feed_channel
from app.keys import redis_key

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0  # proxies close connections that stay silent for long
BACKLOG = 1000  # a stream this far behind is cut off; the browser reconnects and re-reads the list
_CLOSED = ""


class JobFeed:
    """The transitions published by JobStore, handed to every subscriber in order."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[str]] = set()
        self.ready = asyncio.Event()

    def subscribe(self) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue(BACKLOG)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str]) -> None:
        self._subscribers.discard(queue)

    def publish(self, message: str) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self.close_one(queue)

    def close_one(self, queue: asyncio.Queue[str]) -> None:
        self._subscribers.discard(queue)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(_CLOSED)

    def close(self) -> None:
        for queue in list(self._subscribers):
            self.close_one(queue)

    async def listen(self, redis: Redis) -> None:
        """Relay the Redis channel until cancelled, subscribing again after a Redis failure."""
        while True:
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(feed_channel(redis))
                    self.ready.set()
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            self.publish(message["data"].decode())
            except (RedisError, OSError) as exc:
                self.ready.clear()
                log.warning("job feed lost Redis (%s); subscribing again in 1 s", type(exc).__name__)
                await asyncio.sleep(1)


feed_key = web.AppKey("job_feed", JobFeed)


async def feed_context(app: web.Application) -> AsyncIterator[None]:
    feed = app[feed_key] = JobFeed()
    task = asyncio.create_task(feed.listen(app[redis_key]))
    yield
    feed.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def close_streams(app: web.Application) -> None:
    # Open streams would otherwise hold the shutdown until its timeout.
    app[feed_key].close()


async def stream(request: web.Request) -> web.StreamResponse:
    """Each job transition as `event: job` with the job's summary as JSON data."""
    feed = request.app[feed_key]
    queue = feed.subscribe()
    try:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        await asyncio.wait_for(feed.ready.wait(), timeout=5)
        await response.write(b": connected\n\nretry: 2000\n\n")
        while True:
            try:
                message = await asyncio.wait_for(queue.get(), timeout=KEEPALIVE_SECONDS)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if message == _CLOSED:
                break
            await response.write(f"event: job\ndata: {message}\n\n".encode())
    except (TimeoutError, ConnectionResetError):
        pass  # the client went away, or Redis never answered: the client reconnects
    finally:
        feed.unsubscribe(queue)
    return response


def setup_stream(app: web.Application) -> None:
    app.cleanup_ctx.append(feed_context)
    app.on_shutdown.append(close_streams)
    app.router.add_get("/api/stream", stream)
