"""Record loading: every format, and every bad input named by file, line and field."""

from __future__ import annotations

import gzip
import json

import pytest

from paser.errors import InputError
from paser.io.records import Record, load_pool, load_records, record_id

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "category": "math"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_alpaca_json_array(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(ALPACA, indent=2))
    recs, rep = load_records(p)
    assert [r.instruction for r in recs] == ["Add the numbers.", "Say hi."]
    assert recs[0].input == "2 and 3" and recs[0].output == "5"
    assert recs[0].extra == {"category": "math"}  # unknown fields kept
    assert recs[0].source == "a" and rep.kept == 2


def test_jsonl_gz_and_aliases(tmp_path):
    p = tmp_path / "gsm.jsonl.gz"
    p.write_bytes(gzip.compress(_jsonl([{"question": "1+1?", "answer": "2"}]).encode()))
    (r,), _ = load_records(p)
    assert (r.instruction, r.input, r.output) == ("1+1?", "", "2")


def test_ids_are_stable_content_hashes(tmp_path):
    a = Record("x", "", "y")
    assert a.id == record_id("x", "", "y") == Record(" x ", "", "y").id
    assert a.id != Record("x", "", "z").id
    p = tmp_path / "a.jsonl"
    p.write_text(_jsonl(ALPACA))
    q = tmp_path / "b.json"
    q.write_text(json.dumps(ALPACA))
    assert [r.id for r in load_records(p)[0]] == [r.id for r in load_records(q)[0]]


def test_sharegpt_and_messages(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text(
        _jsonl(
            [
                {"conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}, {"from": "human", "value": "More"}]},
                {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]},
            ]
        )
    )
    a, b = load_records(p)[0]
    assert (a.instruction, a.output) == ("Hello?", "Hi.") and a.extra["later_turns"][0]["value"] == "More"
    # the system prompt stays a system prompt, never the Alpaca input
    assert (b.instruction, b.input, b.system, b.output) == ("Name a colour.", "", "Be brief.", "Red.")
    assert a.chat and b.chat and a.later_turns == [{"from": "human", "value": "More"}]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ALPACA[1:] + [{"instruction": "Q", "input": "", "output": "A"}]), p)
    recs, _ = load_records(p)
    assert [r.output for r in recs] == ["Hi!", "A"]


def test_saved_hf_dataset(tmp_path):
    import datasets

    d = tmp_path / "ds"
    datasets.Dataset.from_list([{"instruction": "Q", "input": "", "output": "A"}]).save_to_disk(str(d))
    (r,), _ = load_records(d)
    assert r.output == "A"


@pytest.mark.parametrize(
    "content, line, field, words",
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', 2, None, "malformed JSON"),
        ('{"instruction": "a", "output": "b"}\n{"input": "x", "output": "y"}\n', 2, "instruction", "missing"),
        ('{"instruction": "a"}\n', 1, "output", "missing"),
        ('{"instruction": "a", "output": ""}\n', 1, "output", "empty"),
        ('{"instruction": "a", "output": 3.5, "input": ["x"]}\n', 1, "input", "expected text"),
        ('[1, 2]', None, None, "JSON object"),
    ],
)
def test_bad_input_names_file_line_field(tmp_path, content, line, field, words):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(InputError) as ei:
        load_records(p)
    e = ei.value
    assert e.path == str(p) and words in str(e)
    if line is not None:
        assert e.line == line and f"line {line}" in str(e)
    if field is not None:
        assert e.field == field and f"'{field}'" in str(e)


def test_json_array_error_line(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n')
    with pytest.raises(InputError) as ei:
        load_records(p)
    assert ei.value.line == 3 and ei.value.field == "output"


def test_non_utf8_and_empty(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(InputError, match="not UTF-8") as ei:
        load_records(p)
    assert ei.value.line == 2
    e = tmp_path / "empty.json"
    e.write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        load_records(e)
    with pytest.raises(InputError, match="no such file"):
        load_records(tmp_path / "missing.json")


def test_skip_invalid_counts(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_text(
        '{"instruction": "a", "output": "b"}\nnot json\n{"instruction": "c"}\n{"instruction": "a", "output": "b"}\n{"instruction": "d", "output": "e"}\n'
    )
    recs, rep = load_records(p, skip_invalid=True)
    assert [r.instruction for r in recs] == ["a", "d"]
    assert rep.skipped == {"malformed JSON": 1, "bad 'output'": 1, "duplicate": 1}
    assert "skipped" in rep.summary()


def test_exact_duplicates_are_dropped_with_a_counted_warning(tmp_path, caplog):
    p = tmp_path / "dup.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": "b", "id": 7}\n{"instruction": "c", "output": "d"}\n')
    with caplog.at_level("WARNING", logger="paser.io.records"):
        recs, rep = load_records(p)
    assert [r.instruction for r in recs] == ["a", "c"] and rep.skipped == {"duplicate": 1}
    assert "dropped 1 exact duplicate" in caplog.text and str(p) in caplog.text


def test_pool_dedups_across_files(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(_jsonl(ALPACA))
    b.write_text(_jsonl(ALPACA[:1] + [{"instruction": "New", "output": "x"}]))
    pool, reps = load_pool([a, b])
    assert len(pool) == 3 and reps[1].skipped["duplicate across files"] == 1


def test_embedded_data_loads():
    from paser import data

    pool, _ = load_records(data.pool_path())
    held, _ = load_records(data.heldout_path())
    assert len(pool) == 7400 and len(held) == 600
    assert not {r.id for r in pool} & {r.id for r in held}
    assert {r.extra["capability"] for r in pool} == {"general", "math", "code"}
    for task in data.COMMONSENSE_TASKS:
        assert len(data.load_commonsense(task)) >= 500
    wt = data.ppl_text("wikitext2")
    assert "\n\n" in wt and "Robert Boulter" in wt
    assert len(data.ppl_text("ptb")) > 400_000


def test_streaming_ingest_dedups_and_reads_back(tmp_path):
    from paser.io.stream import ingest_pool, iter_records

    a = tmp_path / "a.jsonl.gz"
    rows = [{"instruction": f"Q{i}", "input": "", "output": f"A{i}", "tag": i % 3} for i in range(250)]
    a.write_bytes(gzip.compress(_jsonl(rows + rows[:40]).encode()))  # 40 duplicates
    b = tmp_path / "b.jsonl"
    b.write_text(_jsonl(rows[200:] + [{"instruction": "new", "output": "x"}]))
    assert sum(1 for _ in iter_records(a)) == 290
    rep = ingest_pool([a, b], tmp_path / "store", shard_size=100, show_progress=False)
    assert (rep.records, rep.duplicates, rep.shards) == (251, 90, 3)
    back, _ = load_records(tmp_path / "store")
    assert len(back) == 251 and back[0].extra == {"tag": 0} and back[-1].instruction == "new"
    assert [r.id for r in back[:250]] == [Record(f"Q{i}", "", f"A{i}").id for i in range(250)]


def test_streaming_errors_name_the_line(tmp_path):
    from paser.io.stream import iter_records

    p = tmp_path / "s.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(InputError) as ei:
        list(iter_records(p))
    assert ei.value.line == 2 and ei.value.field == "output"


# ----------------------------------------------------------------------------- data edge cases


@pytest.mark.parametrize(
    "row, field, words",
    [
        ({"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "  "}]}, "conversations", "empty assistant reply"),
        ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": ""}]}, "messages", "empty assistant reply"),
        ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}, "messages", "empty user turn"),
    ],
)
def test_empty_replies_are_rejected_or_skipped(tmp_path, row, field, words):
    p = tmp_path / "chat.jsonl"
    p.write_text(_jsonl([{"instruction": "ok", "output": "fine"}, row]))
    with pytest.raises(InputError) as ei:
        load_records(p)
    assert (ei.value.line, ei.value.field) == (2, field) and words in str(ei.value) and str(p) in str(ei.value)
    recs, rep = load_records(p, skip_invalid=True)
    assert len(recs) == 1 and rep.skipped == {f"bad '{field}'": 1}


def test_non_finite_numbers_are_rejected_or_skipped(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    j = tmp_path / "nan.jsonl"
    j.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": NaN}\n')  # json.loads accepts NaN
    with pytest.raises(InputError, match="not a finite number") as ei:
        load_records(j)
    assert (ei.value.line, ei.value.field) == (2, "output")
    q = tmp_path / "inf.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b", "c"], "output": [1.5, float("inf"), float("nan")]}), q)
    with pytest.raises(InputError, match="not a finite number") as ei:
        load_records(q)
    assert (ei.value.line, ei.value.field) == (2, "output")
    recs, rep = load_records(q, skip_invalid=True)
    assert [r.output for r in recs] == ["1.5"] and rep.skipped == {"bad 'output'": 2}


def test_nan_in_other_fields_is_written_as_null(tmp_path):
    from paser.io.records import write_selected

    p = tmp_path / "meta.jsonl"
    p.write_text('{"instruction": "a", "output": "b", "score": NaN}\n')
    recs, _ = load_records(p)
    write_selected(tmp_path / "sel.jsonl", recs)
    assert json.loads((tmp_path / "sel.jsonl").read_text())["score"] is None  # strict JSON, no NaN


def test_warning_when_every_record_is_near_identical(tmp_path, caplog):
    same = tmp_path / "same.jsonl"
    same.write_text(_jsonl([{"instruction": f"Explain  photosynthesis{'!' if i % 2 else '.'}", "output": f"Answer {i}"} for i in range(20)]))
    with caplog.at_level("WARNING", logger="paser.io.records"):
        load_pool([same])
    assert "100% of the 20 records have the same instruction" in caplog.text
    caplog.clear()
    varied = tmp_path / "varied.jsonl"
    varied.write_text(_jsonl([{"instruction": f"Add {i} and {i + 1}.", "output": str(2 * i + 1)} for i in range(20)]))
    with caplog.at_level("WARNING", logger="paser.io.records"):
        load_pool([varied])
    assert "same instruction" not in caplog.text  # numbers differ: different problems
