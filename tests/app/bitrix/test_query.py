"""The query-string helpers: the fast form parser must read every body exactly as parse_qsl does."""
from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.bitrix.query import parse_query_pairs

TRICKY = [
    "",
    "=",
    "&&a=1&",
    "a=1;b=2",  # ';' is not a separator
    "a+b=c+d%2B",
    "%5B=1",
    "a=%zz&b=%C3%28&c=+x+&d&=e&f==g",  # bad escapes, bad UTF-8, blank and bare keys
    "a=%C3&%A9=b",  # a UTF-8 sequence cut across two fields stays two replacement characters
    "a=%2&b=1",
    "a=%26&%3D=%25",  # escaped separators stay inside their field
    "a=%00&b=%00%00",  # NUL escapes take the slow way
    "data%5BFIELDS%5D%5BID%5D=7&auth%5Bdomain%5D=acme.bitrix24.com",
]


@pytest.mark.parametrize("text", TRICKY)
def test_reads_tricky_bodies_as_parse_qsl_does(text: str) -> None:
    assert parse_query_pairs(text, max_fields=100) == parse_qsl(text, keep_blank_values=True)


@given(st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12)), max_size=12))
def test_reads_any_encoded_form_as_parse_qsl_does(pairs: list[tuple[str, str]]) -> None:
    text = urlencode(pairs)
    assert parse_query_pairs(text, max_fields=100) == parse_qsl(text, keep_blank_values=True) == pairs


@given(st.text(alphabet="ab=&%+2C3Dx0\u00e9", max_size=40))
def test_reads_any_raw_text_as_parse_qsl_does(text: str) -> None:
    assert parse_query_pairs(text, max_fields=100) == parse_qsl(text, keep_blank_values=True)


def test_refuses_more_fields_than_allowed_as_parse_qsl_does() -> None:
    text = "&".join(f"k{i}=v" for i in range(6))
    assert len(parse_query_pairs(text, max_fields=6)) == 6
    with pytest.raises(ValueError, match="more than 5 fields"):
        parse_query_pairs(text, max_fields=5)
    with pytest.raises(ValueError):
        parse_qsl(text, max_num_fields=5)
