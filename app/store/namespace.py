"""Names in Redis under this installation's prefix (B24_KEY_PREFIX), so installations can share one database.

The code writes its names without a prefix (`b24:*` keys, the arq queues, the job feed's channel,
the reconciler's cron job) and passes them through `prefixed()` where they meet Redis. The prefix
is set once, at process start, from the settings. Empty, the default, leaves every name as it always
was, so an upgrade keeps its queued jobs.

arq spells its per-job keys itself (`arq:job:<id>`, `arq:result:`, `arq:in-progress:`,
`arq:retry:`); those stay apart because the prefix also goes into every job id (see
`JobRecord.for_event` and the reconciler's cron name).
"""
from __future__ import annotations

_prefix = ""


def use_prefix(prefix: str) -> None:
    """Set this process's prefix (Settings.key_prefix); call it once, before anything uses Redis."""
    global _prefix
    _prefix = prefix


def prefixed(name: str) -> str:
    """The name as this installation spells it in Redis."""
    return _prefix + name
