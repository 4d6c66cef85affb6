"""PHP-style query strings, the format of `batch` commands (`filter[>ID]=5&select[]=ID`)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, quote, unquote_plus


def http_build_query(params: dict[str, Any]) -> str:
    """Encode nested params the way PHP's http_build_query does, which is what `batch` expects."""
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        _flatten(str(key), value, pairs)
    return "&".join(f"{quote(k, safe='[]')}={quote(v, safe='')}" for k, v in pairs)


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}[{key}]", item, out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _flatten(f"{prefix}[{index}]", item, out)
    elif isinstance(value, bool):
        out.append((prefix, "Y" if value else "N"))
    elif value is None:
        out.append((prefix, ""))
    else:
        out.append((prefix, str(value)))


def parse_query_pairs(text: str, *, max_fields: int) -> list[tuple[str, str]]:
    """`urllib.parse.parse_qsl(text, keep_blank_values=True)`, at half its cost for a portal's event.

    parse_qsl unquotes each key and value on its own, and that is most of an event's parsing. Here
    the fields are split first and unquoted in one call, joined by NUL: a separator no escape can
    produce unless the text holds `%00`, which goes the slow way. Raises ValueError over `max_fields`.
    """
    if text.count("&") >= max_fields:
        raise ValueError(f"more than {max_fields} fields")
    if "%00" in text:
        return parse_qsl(text, keep_blank_values=True)
    parts: list[str] = []
    for field in text.split("&"):
        if field:
            key, _, value = field.partition("=")
            parts += (key, value)
    if not parts:
        return []
    decoded = unquote_plus("\0".join(parts)).split("\0")
    return list(zip(decoded[::2], decoded[1::2]))


def parse_php_query(pairs: Iterable[tuple[str, str]], *, max_depth: int = 8) -> dict[str, Any]:
    """Decode PHP-style keys (`data[FIELDS][ID]`, `select[]`) into nested dicts and lists.

    Raises ValueError for keys nested deeper than `max_depth` or that clash (`a=1&a[b]=2`).
    """
    out: dict[str, Any] = {}
    for key, value in pairs:
        head, _, rest = key.partition("[")
        parts = [head] + (rest[:-1].split("][") if rest.endswith("]") else ([rest] if rest else []))
        if len(parts) > max_depth:
            raise ValueError(f"key {key[:40]!r} is nested more than {max_depth} levels deep")
        _put(out, parts, value, key)
    return out


def _put(node: dict[str, Any], parts: list[str], value: str, key: str) -> None:
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = [] if parts[i + 1] == "" else {}
            node[part] = child
        if isinstance(child, list):
            if parts[i + 1] != "" or i + 2 != len(parts):
                raise ValueError(f"key {key[:40]!r} mixes a list with nested keys")
            child.append(value)
            return
        if not isinstance(child, dict):
            raise ValueError(f"key {key[:40]!r} clashes with an earlier value")
        node = child
    if isinstance(node.get(parts[-1]), (dict, list)):
        raise ValueError(f"key {key[:40]!r} clashes with an earlier value")
    node[parts[-1]] = value
