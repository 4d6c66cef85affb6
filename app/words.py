"""Words for counts, the same in every command, log line and job record."""
from __future__ import annotations


def plural(count: int, noun: str, many: str | None = None) -> str:
    """`1 item`, `3 items`, `0 items`; `many` for nouns that do not just take an s."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"
