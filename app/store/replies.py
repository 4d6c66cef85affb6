"""Renamed `app.store.redis_typing` (issue 23: a name for what it holds). A re-export until issue 22's
relay, locks and jobs modules import from there; then delete it."""
from app.store.redis_typing import awaited as awaited
