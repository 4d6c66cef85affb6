"""A binding is a value: one JSON shape, one reader of its text, readable for people."""
from __future__ import annotations

import pytest

from app.rules.facts import Binding, bindings_json, bindings_text, read_bindings
from app.rules.model import EntityType


def test_a_binding_reads_back_from_its_json_and_from_its_text() -> None:
    contact, quote = Binding(entity_type=EntityType.CONTACT, entity_id=42), Binding(entity_type=7, entity_id=5)

    assert bindings_json([contact, quote]) == [{"entity_type": 3, "entity_id": 42}, {"entity_type": 7, "entity_id": 5}]
    assert read_bindings(bindings_json([contact, quote])) == [contact, quote]
    # Job records and audit entries written before bindings were values hold text; they live for days.
    assert read_bindings(["contact 42", "type7 5"]) == [contact, quote]
    assert Binding.parse(str(contact)) == contact and Binding.parse(" Contact 42 ") == contact
    assert read_bindings(["contact 42"])[0].entity_type is EntityType.CONTACT


def test_people_read_bindings_as_text() -> None:
    assert bindings_text([{"entity_type": 1, "entity_id": 7}, "contact 42", Binding(entity_type=128, entity_id=3)]) \
        == "lead 7, contact 42, type128 3"
    assert bindings_text([]) == ""


@pytest.mark.parametrize("text", ["contact", "contact x", "person 4", "", "42"])
def test_text_that_is_no_binding_says_how_to_write_one(text: str) -> None:
    with pytest.raises(ValueError, match="write a type and an id, such as `contact 42`"):
        Binding.parse(text)
