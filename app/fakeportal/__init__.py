"""A fake Bitrix24 portal over real HTTP, for the test suite, the benchmarks and the `demo` mode only."""

from app.fakeportal.state import (
    COMPANY,
    CONTACT,
    DEAL,
    LEAD,
    QUOTE,
    SMART_INVOICE,
    TYPE_NAMES,
    FakePortal,
    parse_php_query,
)

__all__ = ["COMPANY", "CONTACT", "DEAL", "LEAD", "QUOTE", "SMART_INVOICE", "TYPE_NAMES", "FakePortal", "parse_php_query"]
