"""The event loop the long-running processes use: uvloop where it is installed, asyncio's own otherwise.

uvloop roughly halves the CPU each request and each Redis round trip costs (docs/benchmarks.md); it
is a dependency on Linux and macOS, and absent on Windows, where asyncio's loop serves as before.
"""
from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on the fastest loop available."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def settle_heap() -> None:
    """Call once started: what startup made (modules, models, pools) lives as long as the process.

    Frozen, those objects are left out of every later collection, so a full collection walks only
    what the service made since: tens of milliseconds of stopped event loop become one or two.
    """
    gc.collect()
    gc.freeze()
