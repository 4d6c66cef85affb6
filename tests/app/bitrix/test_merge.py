"""BatchChunk: what one batch sends for the commands packed into it, and each command's answer."""
from __future__ import annotations

from app.bitrix.commands import Command, CommandResult
from app.bitrix.errors import TransientError
from app.bitrix.merge import BatchChunk, shape_of

LEAD_FIELDS = ("ID", "STATUS_ID")


def lead(n: int) -> Command:
    return Command("crm.lead.get", {"id": n}, fields=LEAD_FIELDS)


def contacts_of(lead_id: int) -> Command:
    return Command("crm.contact.list", {"filter": {"LEAD_ID": lead_id}, "select": ["ID"], "order": {"ID": "ASC"}})


def test_gets_that_name_their_fields_go_as_one_list_by_id() -> None:
    chunk = BatchChunk()
    for n in (7, 8, 9):
        chunk.add(lead(n))

    (sent,) = chunk.commands()

    assert sent == Command("crm.lead.list", {"filter": {"@ID": [7, 8, 9]}, "order": {"ID": "ASC"}, "start": -1,
                                             "select": ["ID", "STATUS_ID"]})
    rows = [{"ID": "7", "STATUS_ID": "NEW"}, {"ID": "9", "STATUS_ID": "CONVERTED"}]
    answers = chunk.answers([CommandResult(sent, result=rows)])
    assert [a.result if a else None for a in answers] == [rows[0], None, rows[1]]  # 8: ask it alone
    assert answers[0] is not None and answers[0].command == lead(7)


def test_a_get_that_names_no_fields_is_sent_as_it_is() -> None:
    chunk = BatchChunk()
    chunk.add(Command("crm.lead.get", {"id": 7}))
    chunk.add(Command("crm.lead.get", {"id": 8}))

    assert [c.method for c in chunk.commands()] == ["crm.lead.get", "crm.lead.get"]


def test_lists_by_one_id_field_go_as_one_list_and_each_gets_its_own_rows() -> None:
    chunk = BatchChunk()
    chunk.add(contacts_of(1))
    chunk.add(contacts_of(2))

    (sent,) = chunk.commands()

    assert sent.params["filter"] == {"@LEAD_ID": [1, 2]}
    assert sent.params["select"] == ["ID", "LEAD_ID"]  # to tell whose each row is
    rows = [{"ID": "5", "LEAD_ID": "2"}, {"ID": "6", "LEAD_ID": "2"}]
    first, second = chunk.answers([CommandResult(sent, result=rows)])
    assert first is not None and (first.result, first.total) == ([], 0)
    assert second is not None and (second.result, second.total) == ([{"ID": "5"}, {"ID": "6"}], 2)


def test_a_merged_list_with_more_rows_than_its_page_leaves_every_command_to_be_asked_alone() -> None:
    chunk = BatchChunk()
    chunk.add(contacts_of(1))
    chunk.add(contacts_of(2))
    (sent,) = chunk.commands()

    rows = [{"ID": str(n), "LEAD_ID": "1"} for n in range(50)]

    assert sent.params["start"] == 0  # by LEAD_ID: the count tells whether the page held every row
    assert chunk.answers([CommandResult(sent, result=rows, total=50)]) != [None, None]
    assert chunk.answers([CommandResult(sent, result=rows, total=51, next=50)]) == [None, None]


def test_an_error_of_the_merged_list_is_every_commands_error() -> None:
    chunk = BatchChunk()
    chunk.add(lead(1))
    chunk.add(lead(2))
    (sent,) = chunk.commands()
    error = TransientError("crm.lead.list", "NOT_RUN", "not run")

    answers = chunk.answers([CommandResult(sent, error=error)])

    assert [a.error if a else None for a in answers] == [error, error]


def test_the_same_read_is_sent_once_and_writes_always_each() -> None:
    chunk = BatchChunk()
    read = Command("crm.activity.binding.list", {"activityId": 1})
    write = Command("crm.activity.binding.add", {"activityId": 1, "entityTypeId": 3, "entityId": 2})
    for command in (read, read, write, write):
        chunk.add(command)

    assert chunk.commands() == [read, write, write]
    answers = chunk.answers([CommandResult(read, result=[]), CommandResult(write, result=True),
                             CommandResult(write, result=True)])
    assert [a.result if a else None for a in answers] == [[], [], True, True]


def test_a_chunk_that_may_not_merge_sends_each_point_read() -> None:
    chunk = BatchChunk(merge=False)  # a call that halts: a missing record's "Not found" must stop it
    chunk.add(lead(1))
    chunk.add(lead(2))

    assert chunk.commands() == [lead(1), lead(2)]


def test_fifty_commands_fit_and_point_reads_of_a_kind_still_join_a_full_chunk() -> None:
    chunk = BatchChunk()
    chunk.add(lead(1))
    for n in range(49):
        chunk.add(Command("crm.activity.binding.list", {"activityId": n}))

    assert chunk.size == 50
    assert not chunk.fits(Command("crm.activity.binding.list", {"activityId": 99}))
    assert chunk.fits(lead(2))  # joins the leads' list
    assert not chunk.fits(contacts_of(2))  # a list of another kind would be a 51st command


def test_a_merged_list_holds_at_most_fifty_numbers() -> None:
    chunk = BatchChunk()
    for n in range(1, 61):
        chunk.add(lead(n))

    first, second = chunk.commands()

    assert (len(first.params["filter"]["@ID"]), len(second.params["filter"]["@ID"])) == (50, 10)


def test_only_point_reads_of_crm_records_are_merged() -> None:
    assert shape_of(contacts_of(3)) is not None
    assert shape_of(Command("crm.activity.list", {"filter": {"ID": 4}, "select": ["ID"], "start": -1})) is not None
    not_point_reads = [
        Command("crm.contact.list", {"filter": {"LEAD_ID": 3, "TYPE_ID": "CLIENT"}}),  # two conditions
        Command("crm.contact.list", {"filter": {">LEAD_ID": 3}}),  # an operator
        Command("crm.contact.list", {"filter": {"NAME": 3}}),  # not an ID field
        Command("crm.contact.list", {"filter": {"LEAD_ID": 3}, "start": 50}),  # a later page
        Command("crm.contact.list", {"filter": {"LEAD_ID": 3}, "order": {"DATE_CREATE": "DESC"}}),
        Command("crm.activity.list", {"filter": {"BINDINGS": [{"OWNER_TYPE_ID": 1, "OWNER_ID": 3}]}}),
        Command("crm.timeline.comment.list", {"filter": {"ENTITY_ID": 3}}),
        Command("crm.lead.get", {"id": "3"}, fields=("ID",)),  # a number as text: sent as it is
    ]
    assert [shape_of(c) for c in not_point_reads] == [None] * len(not_point_reads)


def test_a_point_read_alone_of_its_kind_is_sent_as_it_is() -> None:
    chunk = BatchChunk()
    chunk.add(lead(7))
    chunk.add(contacts_of(7))

    assert chunk.commands() == [lead(7), contacts_of(7)]
    answers = chunk.answers([CommandResult(lead(7), result={"ID": "7"}), CommandResult(contacts_of(7), result=[])])
    assert [a.result if a else None for a in answers] == [{"ID": "7"}, []]


def test_a_merged_list_answering_rows_it_did_not_ask_for_is_every_commands_error() -> None:
    chunk = BatchChunk()
    chunk.add(contacts_of(7))
    chunk.add(contacts_of(8))
    (sent,) = chunk.commands()
    # A portal that does not know the field drops the filter and answers the whole table.
    rows = [{"ID": "1", "LEAD_ID": "7"}, {"ID": "2", "LEAD_ID": None}, {"ID": "3", "LEAD_ID": "8"}]

    answers = chunk.answers([CommandResult(sent, result=rows)])

    assert [a.error.code if a and a.error else None for a in answers] == ["LIST_NOT_FILTERED"] * 2
    assert answers[0] is not None and "LEAD_ID None" in str(answers[0].error)


def test_a_merged_get_answering_an_id_it_did_not_ask_for_is_an_error() -> None:
    chunk = BatchChunk()
    for n in (7, 8):
        chunk.add(lead(n))
    (sent,) = chunk.commands()
    answers = chunk.answers([CommandResult(sent, result=[{"ID": "7"}, {"ID": "5"}])])
    assert all(a is not None and a.error is not None and a.error.code == "LIST_NOT_FILTERED" for a in answers)
