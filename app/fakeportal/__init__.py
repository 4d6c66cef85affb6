"""A fake Bitrix24 portal over real HTTP, for the test suite, the benchmarks and the `demo` mode only.

Read it in this order:
- `records`: the CRM's records (leads, contacts, companies, deals, other items) and the constants naming them;
- `activities`: activities and timeline comments, their bindings and the owner the portal recalculates;
- `state`: the portal's rules over both (conversion, a lead closing, deleting a record);
- `methods`: the REST methods over that state, a module per family (`methods.activities`, `.entities`,
  `.timeline`, `.offline`, and `.echoes`, the events the portal posts back), with their error codes;
- `faults`: the request and operating-time limits, and the failures a test injects;
- `server`: `FakePortal`, the HTTP server that authenticates, runs a method or a `batch`, and answers;
- `protocol`: PHP-style parameters, filters, pages and the answer envelope, shared by the others.

No production module imports this package (tests/test_architecture.py keeps it so).
"""

from app.fakeportal.faults import LeakyBucket
from app.fakeportal.protocol import PAGE_SIZE, BitrixError, Page, parse_php_query
from app.fakeportal.server import MAX_BATCH, FakePortal, FakePortalHost, RequestRecord
from app.fakeportal.records import (
    CLIENT_TYPES,
    COMPANY,
    COMPLETABLE_TYPES,
    CONTACT,
    DEAL,
    LEAD,
    QUOTE,
    SMART_INVOICE,
    TYPE_NAMES,
    Binding,
)

__all__ = [
    "CLIENT_TYPES",
    "COMPANY",
    "COMPLETABLE_TYPES",
    "CONTACT",
    "DEAL",
    "LEAD",
    "MAX_BATCH",
    "PAGE_SIZE",
    "QUOTE",
    "SMART_INVOICE",
    "TYPE_NAMES",
    "Binding",
    "BitrixError",
    "FakePortal",
    "FakePortalHost",
    "LeakyBucket",
    "Page",
    "RequestRecord",
    "parse_php_query",
]
