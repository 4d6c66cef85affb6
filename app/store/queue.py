"""Putting jobs on the arq queue, with a JSON serializer so queued jobs stay readable."""
from __future__ import annotations

import asyncio
import logging
import time
import zlib
from typing import Any, cast

import orjson
from arq.connections import ArqRedis, RedisSettings
from arq.constants import expires_extra_ms, in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError, TimeoutError

from app.settings import Settings
from app.store.jobs import INDEX_PREFIX, JobRecord, JobState, JobStore, QueueEntry
from app.store.namespace import prefixed
from app.store.redis_target import redis_target

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

PROCESS_EVENT = "process_event"
RESCUE_CRON = "cron:requeue_stranded"  # the minute's look for stranded jobs (see JobQueue.requeue_stranded)
SWEEP_CRON = "cron:reconcile_job"  # arq's name for the reconcile sweep's cron (its job ids start with it)
LIVE_QUEUE = "arq:queue"
# A job whose record still waits to run this long after its event arrived, with no arq job behind it,
# is stranded (arq gave up on it, or a Redis restarted without its data): it is queued again.
STRANDED_AFTER = 300.0
BACKFILL_QUEUE = "arq:queue:backfill"  # history, worked on with the portal budget live events leave over
# With B24_REDIS_MIN_REPLICAS, how long intake waits for the replicas to confirm a job before it
# spools the event instead (a replica on the same network confirms in well under a millisecond).
REPLICA_WAIT = 1.0
REPLICA_MARK = "b24:intake:replicated"  # written after each job, so WAIT also covers one written earlier

SHARD_SUFFIX = ":shard"  # shard K > 0's queues: arq:queue:shardK, arq:queue:backfill:shardK (shard 0 keeps the names above)

# Portals are split between B24_WORKER_SHARDS shards, each served by one worker process, so that a
# portal's jobs all run in one process and its commands pack into full batches (docs/architecture.md,
# step 7). Set once per process from the settings (`use_shards`), as the key prefix is.
_shards = 1


def use_shards(count: int) -> None:
    """How many shards this process's enqueuers route portals to (Settings.worker_shards)."""
    global _shards
    _shards = max(1, count)


def shard_count() -> int:
    return _shards


def shard_of(portal: str, shards: int | None = None) -> int:
    """A portal's shard: a stable hash of its name (the same in every process and release; Python's
    `hash` is salted per process)."""
    count = _shards if shards is None else shards
    return zlib.crc32(portal.encode()) % count if count > 1 else 0


def live_queue(shard: int = 0) -> str:
    """A shard's live queue (unprefixed, as LIVE_QUEUE); shard 0's is today's LIVE_QUEUE."""
    return LIVE_QUEUE + (f"{SHARD_SUFFIX}{shard}" if shard else "")


def backfill_queue(shard: int = 0) -> str:
    return BACKFILL_QUEUE + (f"{SHARD_SUFFIX}{shard}" if shard else "")


def is_live_queue(name: str) -> bool:
    """A shard's live queue (unprefixed), not a backfill one."""
    return name == LIVE_QUEUE or name.startswith(LIVE_QUEUE + SHARD_SUFFIX)


async def queues_beyond(redis: ArqRedis, shards: int) -> dict[int, list[str]]:
    """Shard queues (unprefixed) that hold jobs but that no worker serves at this shard count (the count was
    lowered): by the shard that serves them now (their number modulo the count). One SCAN, at a worker's start."""
    found: dict[int, list[str]] = {}
    for pattern in (LIVE_QUEUE, BACKFILL_QUEUE):
        async for key in redis.scan_iter(match=prefixed(pattern + SHARD_SUFFIX) + "*", count=1000, _type="zset"):
            name = key.decode() if isinstance(key, bytes) else str(key)
            number = name.rsplit(SHARD_SUFFIX, 1)[1]
            if number.isdigit() and int(number) >= shards and await redis.zcard(name):
                found.setdefault(int(number) % shards, []).append(f"{pattern}{SHARD_SUFFIX}{number}")
    return {shard: sorted(queues) for shard, queues in found.items()}


def serialize(job: dict[str, Any]) -> bytes:
    # arq also stores a failed job's exception as its result: keep its text rather than fail.
    return orjson.dumps(job, default=repr, option=orjson.OPT_NON_STR_KEYS)


def deserialize(raw: bytes) -> dict[str, Any]:
    return orjson.loads(raw)  # type: ignore[no-any-return]


def redis_settings(settings: Settings) -> RedisSettings:
    """Where this installation's Redis is: REDIS_URL (a server, or `redis+sentinel://` Sentinels and the
    name of their primary), or the primary REDIS_SENTINELS name. ValueError, one line, when malformed."""
    return redis_target(settings.redis_url, settings.redis_sentinels, settings.redis_sentinel_master)


def _retries() -> dict[str, Any]:
    """Each command rides out a connection lost mid-way (a Redis restarting, a failover) by
    reconnecting a few times with jittered backoff, about 2 s in all; a longer outage raises, and each
    process waits it out at its own level (the worker's poll, the web process's spool)."""
    return {"retry": Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.1), retries=4),
            "retry_on_error": [ConnectionError, TimeoutError]}


async def connect(settings: Settings | str, *, wait: bool = True) -> ArqRedis:
    """The one way the service opens Redis: web, workers and commands alike.

    With `wait` the first connection is made here, so a command fails at once on a Redis that is
    away; without it (the long-running processes) the client is made whatever Redis's state, and
    each command connects when it runs.
    Tests and benchmarks may give a bare URL: that Redis and nothing else from the environment.
    """
    if isinstance(settings, str):
        settings = Settings.model_construct(redis_url=settings)
    target = redis_settings(settings)
    if target.sentinel:
        redis = _through_sentinels(target)
    else:
        pool = ConnectionPool.from_url(settings.redis_url or "redis://", socket_connect_timeout=target.conn_timeout,
                                       max_connections=target.max_connections, **_retries())
        redis = cast(ArqRedis, ArqRedis.from_pool(pool))  # from_pool is typed as returning a plain Redis
    redis.job_serializer, redis.job_deserializer = serialize, deserialize
    if wait:
        try:
            await redis.ping()  # as arq's create_pool does: no Redis, or a wrong password, fails here
        except BaseException:
            await redis.aclose()
            raise
    return redis


_primaries_said: dict[str, Any] = {}  # service name -> the primary this process last said it follows


class FollowedPrimary(SentinelConnectionPool):
    """redis-py's pool of connections to the primary the Sentinels name, which says in one line when
    they name another one (a failover): from then on every new connection goes to it. Said once a
    process, however many pools it has."""

    async def get_master_address(self) -> Any:
        before = self.master_address
        address = await super().get_master_address()  # type: ignore[no-untyped-call]  # untyped in redis-py
        said = _primaries_said.setdefault(self.service_name, address)
        if before is not None and address != before and address != said:
            _primaries_said[self.service_name] = address
            log.warning("Redis failed over: the Sentinels name %s:%s as primary %r now (it was %s:%s); "
                        "connections follow it", *address, self.service_name, *before)
        return address


class SentinelArqRedis(ArqRedis):
    """ArqRedis on the primary the sentinels name; closing it also closes its connections to the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for sentinel in cast(SentinelConnectionPool, self.connection_pool).sentinel_manager.sentinels:
            await sentinel.aclose()


def _through_sentinels(target: RedisSettings) -> ArqRedis:
    # What arq's create_pool does for Sentinel, plus a connect timeout (a Redis that is away must fail
    # fast: the web process spools meanwhile) and a close that leaves no connection to a sentinel open.
    sentinels = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves its __init__ untyped
        target.host, socket_connect_timeout=target.conn_timeout, db=target.database, username=target.username,
        password=target.password, ssl=target.ssl, **_retries())
    return cast(ArqRedis, sentinels.master_for(target.sentinel_master, redis_class=SentinelArqRedis,
                                               connection_pool_class=FollowedPrimary))


class ReplicasNotConfirmed(ConnectionError):
    """The job is on the primary, but fewer replicas than B24_REDIS_MIN_REPLICAS confirmed it in time.

    A failover now could lose it, so it is not yet safe: callers treat it as Redis being away (the web
    process spools the event, the spool keeps its line and tries again), and the delivery id makes the
    second write of the same job a no-op."""


class JobQueue:
    """Accepts a job: its record first, then the queue entry, both in Redis before anyone is told."""

    def __init__(self, redis: ArqRedis, store: JobStore, min_replicas: int = 0) -> None:
        self._redis = redis
        self.store = store
        self.min_replicas = min_replicas  # B24_REDIS_MIN_REPLICAS: replicas that must have a job before it counts

    async def submit(self, record: JobRecord) -> bool:
        """Queue a job; False when the same delivery was accepted before (nothing new is queued).

        The record and arq's job are written in one atomic step (arq's own `enqueue_job` takes three
        round trips more), so an accepted event is never half-stored.
        """
        record.queued_at = time.time()
        now_ms = int(record.queued_at * 1000)
        payload = serialize_job(PROCESS_EVENT, (record.task_args(),), {}, None, now_ms, serializer=serialize)
        entry = QueueEntry(_queue_of(record), record.id, payload, now_ms, expires_extra_ms)
        if not self.min_replicas:
            return await self.store.create(record, entry)
        return await self._create_replicated(record, entry)

    async def _create_replicated(self, record: JobRecord, entry: QueueEntry) -> bool:
        """`store.create`, answered only once `min_replicas` replicas have the job (Redis's WAIT).

        WAIT counts the replicas that have every write made so far on its own connection, so the job's
        script, a mark written after it and the WAIT go down one connection, as one pipeline (redis-py
        first checks that the script is loaded: two round trips, and the replica's in between). The mark
        makes WAIT cover a job that exists already (a duplicate delivery, a spooled event written before
        its WAIT failed): replication keeps the primary's order, so a replica with the mark has the job.
        """
        async with asyncio.timeout(REPLICA_WAIT + 5):  # WAIT ends itself; this is for a stalled connection
            async with self._redis.pipeline(transaction=False) as pipe:
                await self.store.stage_create(pipe, record, entry)
                pipe.set(prefixed(REPLICA_MARK), record.id)
                pipe.execute_command("WAIT", self.min_replicas, int(REPLICA_WAIT * 1000))
                created, _, replicas = await pipe.execute()
        if replicas < self.min_replicas:
            raise ReplicasNotConfirmed(
                f"only {replicas} of {self.min_replicas} Redis replicas (B24_REDIS_MIN_REPLICAS) confirmed the job "
                f"within {REPLICA_WAIT:g} s (check them: INFO replication)")
        return bool(created)

    async def requeue(self, record: JobRecord) -> bool:
        """Queue an existing job again (a retry asked for by a person); False when arq has it queued or
        under way already (it runs then, and finds the record queued)."""
        record.state, record.error, record.outcome, record.finished_at = JobState.QUEUED, None, "", None
        await self.store.save(record)
        queued = await self._enqueue(record)
        if not queued:
            log.info("job %s is in arq's queue or under way already: not queued a second time", record.id)
        return queued

    async def requeue_stranded(self, now: float | None = None, limit: int = 1000) -> list[str]:
        """Queue again the jobs whose records say they are still to run (queued, running, retrying) but
        that have no arq job and no worker on them; each record says why. Returns their ids."""
        until = (now or time.time()) - STRANDED_AFTER
        candidates: list[str] = []
        for state in (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING):
            index = prefixed(f"{INDEX_PREFIX}state:{state.value}")
            candidates += [i.decode() for i in await self._redis.zrangebyscore(index, "-inf", until, 0, limit)]
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in candidates:
                pipe.exists(job_key_prefix + job_id, in_progress_key_prefix + job_id)
            alive = await pipe.execute()
        rescued = []
        for job_id, keys in zip(candidates, alive):
            record = await self.store.get(job_id) if keys == 0 else None
            if record is not None and await self.queue_again(record, "its job had left the queue"):
                rescued.append(job_id)
        return rescued

    async def queue_again(self, record: JobRecord, why: str) -> bool:
        """A job whose record says it is still to run (queued, running, retrying) but that arq no longer
        has: queued again, its record saying why. False (nothing done) when the record has ended, or
        arq has the job queued or under way already."""
        if record.state not in (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING):
            return False
        was = record.state.value
        if not await self._enqueue(record):
            return False
        record.outcome = f"queued again: {why} while it was {was}"
        record.state = JobState.QUEUED
        await self.store.save(record)
        return True

    async def _enqueue(self, record: JobRecord) -> bool:
        """arq queues a job id once, and not while it keeps a result for it (a run that ended before
        the record could say so, or one it gave up on): that old result goes first. False when arq
        refused all the same (the job is queued, or under way)."""
        await self._redis.delete(result_key_prefix + record.id)
        job = await self._redis.enqueue_job(PROCESS_EVENT, record.task_args(), _job_id=record.id,
                                            _queue_name=_queue_of(record))
        return job is not None


def _queue_of(record: JobRecord) -> str:
    """The queue of the record's portal's shard: every enqueuer (intake, spool, retry, undo, rescue,
    backfill, reconcile) goes through here."""
    shard = shard_of(record.portal)
    return prefixed(backfill_queue(shard) if record.trigger == "backfill" else live_queue(shard))
