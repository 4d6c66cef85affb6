"""GET /api/stream: job transitions as server-sent events, for the dashboard and `jobs watch`.

One Redis subscription per web process fans out to every open stream, so a dozen open dashboards
cost one Redis connection, not a dozen; and it exists only while a stream is open, since every
accepted event publishes a transition that a process would otherwise receive and parse for nobody.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.api.keys import redis_key
from app.store.jobs import feed_channel

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0  # proxies close connections that stay silent for long
BACKLOG = 1000  # a stream this far behind is cut off; the browser reconnects and re-reads the list
_CLOSED = ""


class JobFeed:
    """The transitions published by JobStore, handed to every subscriber in order."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._subscribers: set[asyncio.Queue[str]] = set()
        self._listener: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    def subscribe(self) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue(BACKLOG)
        self._subscribers.add(queue)
        if self._listener is None:
            self._listener = asyncio.create_task(self.listen(self._redis))
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str]) -> None:
        self._subscribers.discard(queue)
        if not self._subscribers and self._listener is not None:
            self._listener.cancel()  # the subscription closes with it
            self._listener = None
            self.ready.clear()

    def publish(self, message: str) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self.close_one(queue)

    def close_one(self, queue: asyncio.Queue[str]) -> None:
        self.unsubscribe(queue)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(_CLOSED)

    async def close(self) -> None:
        listener = self._listener
        for queue in list(self._subscribers):
            self.close_one(queue)
        if listener is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await listener

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
    feed = app[feed_key] = JobFeed(app[redis_key])
    yield
    await feed.close()


async def close_streams(app: web.Application) -> None:
    # Open streams would otherwise hold the shutdown until its timeout.
    await app[feed_key].close()


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
