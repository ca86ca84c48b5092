"""The user's schema kept: selected records are written as they came in, conversations keep
their system prompt in the system role and are encoded with the chat template, TRL-ready
output formats, and ids that survive a round trip through selected.jsonl."""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import make_tokenizer

from paser.config import SelectArgs
from paser.errors import InputError
from paser.io.records import Record, load_pool, load_records, record_id, selected_row, write_selected
from paser.io.templates import encode_example, render_prompt

# ChatML, as SmolLM2-Instruct and Qwen2 write it.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _chat_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = CHATML
    return tok


def _messages_rows(n: int = 8) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append(
            {
                "id": f"conv-{i}",  # the user's own ids
                "messages": [
                    {"role": "system", "content": f"You answer in {i + 1} words."},
                    {"role": "user", "content": f"Name colour number {i}."},
                    {"role": "assistant", "content": f"Colour {i} is red."},
                ],
                "meta": {"lang": "en", "rank": i},
            }
        )
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _select(tmp_path, data, fmt="records", budget="3"):
    from paser.select.run import run_selection

    args = SelectArgs(
        data=[str(data)], method="random", budget=budget, out=str(tmp_path / "sel"), plots=False, estimate=False,
        cache_dir=str(tmp_path / "cache"), selected_format=fmt,
    )
    res = run_selection(args)
    lines = (tmp_path / "sel" / "selected.jsonl").read_text().splitlines()
    return res, [json.loads(x) for x in lines]


def test_select_keeps_messages_system_prompt_and_ids(tmp_path):
    rows = _messages_rows()
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    res, out = _select(tmp_path, data)
    assert len(out) == 3
    by_id = {r["id"]: r for r in rows}
    for row in out:
        assert row == by_id[row["id"]]  # every field as it came in: own id, messages, metadata
    # read back (what `paser recover --data selected.jsonl` does): the same records, same content ids
    back, _ = load_records(tmp_path / "sel" / "selected.jsonl")
    assert [r.id for r in back] == res.selected_ids
    assert all(r.chat and r.system.startswith("You answer in") and r.input == "" for r in back)
    assert [r.user_id for r in back] == [row["id"] for row in out]


def test_selected_conversations_train_with_the_chat_template(tmp_path):
    from paser.recover.data import encode_records

    data = _write_jsonl(tmp_path / "chat.jsonl", _messages_rows(4))
    _select(tmp_path, data, budget="2")
    back, _ = load_records(tmp_path / "sel" / "selected.jsonl")
    tok = _chat_tokenizer()
    ds = encode_records(back, tok, template="alpaca", cutoff=256)  # recovery's encoder
    for rec, ex in zip(back, ds.examples):
        msgs = [{"role": "system", "content": rec.system}, {"role": "user", "content": rec.instruction}]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        n = len(p_ids)
        assert ex["input_ids"][:n] == p_ids and ex["labels"][:n] == [-100] * n
        reply = tok.decode(ex["input_ids"][n:])
        assert reply.startswith(rec.output + "<|im_end|>") and ex["input_ids"][-1] == tok.eos_token_id


def test_encode_example_puts_the_system_prompt_in_the_system_role():
    rec = Record("Name a colour.", "", "Red.", system="Be brief.", chat=True)
    tok = _chat_tokenizer()
    prompt = render_prompt(rec, "alpaca", tok)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert "### Input:" not in prompt
    enc = encode_example(rec, tok, "alpaca", cutoff=256)
    assert enc.input_ids[: enc.n_prompt] == tok(prompt, add_special_tokens=False)["input_ids"]
    # without a chat template the system prompt replaces Alpaca's preamble, never "### Input:"
    plain = make_tokenizer()
    text = render_prompt(rec, "alpaca", plain)
    assert text == "Be brief.\n\n### Instruction:\nName a colour.\n\n### Response:\n"


def test_alpaca_records_are_encoded_as_before():
    """The embedded default path is byte-identical: same record ids, prompts and token ids as
    before conversations got their own encoding (hashes taken from the previous code)."""
    from paser import data

    recs, _ = load_records(data.pool_path())
    tok = make_tokenizer()
    assert not any(r.chat or r.system for r in recs)
    assert recs[0].id == "fb41c62310806068"
    ids = hashlib.sha256("\n".join(r.id for r in recs).encode()).hexdigest()
    assert ids == "7263b1847c8f58eaf6dbf7f5d68c606a9110e2d963e4d2c135fc2e70b9cbf059"
    prompts = hashlib.sha256("\x00".join(render_prompt(r) for r in recs[:300]).encode()).hexdigest()
    assert prompts == "ac5c55e40c66fae904d32916e8a2c9454f011552bd4bb60213032e1aff8716dd"
    enc = [encode_example(r, tok, "alpaca", 256) for r in recs[:300]]
    toks = hashlib.sha256(json.dumps([[e.input_ids, e.n_prompt] for e in enc]).encode()).hexdigest()
    assert toks == "e758381b37cf5dab5137a5cc39122bb7754483860c051a3338e218c08281232f"
    # a tokenizer with a chat template changes nothing for them either
    chat_tok = _chat_tokenizer()
    assert [encode_example(r, chat_tok, "alpaca", 256).input_ids for r in recs[:20]] == [e.input_ids for e in enc[:20]]


def test_id_round_trip_keeps_user_ids_apart_from_content_ids(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "instruction": "Add 2 and 3.", "output": "5"}])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"id": 1, "instruction": "Say hi.", "output": "Hi!"}])
    pool, _ = load_pool([a, b])  # the same user id, other content: two records
    assert [r.user_id for r in pool] == [1, 1] and pool[0].id != pool[1].id
    assert pool[0].id == record_id("Add 2 and 3.", "", "5")  # caches stay keyed by content
    write_selected(tmp_path / "sel.jsonl", pool)
    back, _ = load_records(tmp_path / "sel.jsonl")
    assert [r.id for r in back] == [r.id for r in pool] and [r.user_id for r in back] == [1, 1]
    assert json.loads((tmp_path / "sel.jsonl").read_text().splitlines()[0]) == {"id": 1, "instruction": "Add 2 and 3.", "output": "5"}


def test_sharegpt_later_turns_and_rows_without_id(tmp_path):
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},
                             {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}
    p = _write_jsonl(tmp_path / "sg.jsonl", [row, {**row, "conversations": row["conversations"][:3]}])
    recs, rep = load_records(p)
    assert len(recs) == 2 and rep.n_skipped == 0  # later turns differ: not duplicates
    write_selected(tmp_path / "sel.jsonl", recs)
    out = [json.loads(x) for x in (tmp_path / "sel.jsonl").read_text().splitlines()]
    assert out[0] == {**row, "id": recs[0].id}  # a row without an id gets paser's content id
    assert [r.id for r in load_records(tmp_path / "sel.jsonl")[0]] == [r.id for r in recs]


def test_trl_formats(tmp_path):
    chat = Record("Name a colour.", "", "Red.", system="Be brief.", chat=True, user_id="c1")
    alp = Record("Add the numbers.", "2 and 3", "5")
    pc = selected_row(chat, "prompt-completion")
    assert pc == {"id": "c1", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
                  "completion": [{"role": "assistant", "content": "Red."}]}
    pa = selected_row(alp, "prompt-completion", "alpaca")
    assert pa == {"id": alp.id, "prompt": render_prompt(alp, "alpaca"), "completion": "5"}  # what paser scored
    msgs = selected_row(chat, "messages")["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert selected_row(alp, "messages")["messages"][0] == {"role": "user", "content": "Add the numbers.\n\n2 and 3"}
    # conversations read back from either TRL format are the same records
    write_selected(tmp_path / "m.jsonl", [chat], "messages")
    write_selected(tmp_path / "pc.jsonl", [chat], "prompt-completion")
    for name in ("m.jsonl", "pc.jsonl"):
        (r,), _ = load_records(tmp_path / name)
        assert r.id == chat.id and r.system == "Be brief." and r.user_id == "c1"
    with pytest.raises(ValueError, match="unknown selected format"):
        write_selected(tmp_path / "x.jsonl", [chat], "text")


def test_select_writes_prompt_completion(tmp_path):
    data = _write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"Task {i}.", "input": "", "output": f"Done {i}."} for i in range(6)])
    _, out = _select(tmp_path, data, fmt="prompt-completion", budget="2")
    assert all(set(r) == {"id", "prompt", "completion"} and r["prompt"].endswith("### Response:\n") for r in out)


def test_ingested_store_keeps_the_schema(tmp_path):
    from paser.io.stream import ingest_pool

    rows = _messages_rows(5)
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    ingest_pool([data], tmp_path / "store", show_progress=False)
    back, _ = load_records(tmp_path / "store")
    assert [r.as_given() for r in back] == [{**r, "source": "chat"} for r in rows]
    assert [r.id for r in back] == [r.id for r in load_records(data)[0]]


def test_encoder_option_and_errors(tmp_path):
    from paser.config import build_args
    from paser.errors import ModelError
    from paser.select.embed import ENCODER_NAME, resolve_encoder

    assert build_args(SelectArgs, {"encoder": str(tmp_path)}).encoder == str(tmp_path)
    assert resolve_encoder(ENCODER_NAME) == (None, ENCODER_NAME)
    with pytest.raises(ModelError, match="not a folder"):
        resolve_encoder("no-such-encoder")
    d = tmp_path / "enc"
    d.mkdir()
    (d / "config.json").write_text("{}")
    path, key = resolve_encoder(str(d))
    (d / "config.json").write_text('{"changed": 1}')
    assert path == d.resolve() and key.startswith("enc-") and resolve_encoder(str(d))[1] != key


def test_json_array_errors_name_the_element(tmp_path):
    one_line = tmp_path / "one.json"
    one_line.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, {"instruction": "e"}]))
    with pytest.raises(InputError) as ei:
        load_records(one_line)
    assert ei.value.line == 1 and ei.value.field == "output" and "array element 2" in str(ei.value)
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"instruction": "a", "output": "b"}, {"instruction": "", "output": "d"}]}))
    with pytest.raises(InputError) as ei:
        load_records(wrapped)
    assert ei.value.field == "instruction" and "array element 1" in str(ei.value)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": }]')
    with pytest.raises(InputError, match="array element 1"):
        load_records(broken)


def test_a_reply_ends_at_the_templates_eos():
    """When the chat template closes a turn with EOS, the reply's labels end on it (not on the
    newline the template writes after it), and no second EOS is added."""
    tok = make_tokenizer()
    tok.chat_template = CHATML.replace("<|im_end|>", "</s>")
    rec = Record("Name a colour.", "", "Red.", system="Be brief.", chat=True)
    enc = encode_example(rec, tok, "alpaca", cutoff=256)
    reply = enc.input_ids[enc.n_prompt :]
    assert reply[-1] == tok.eos_token_id and reply.count(tok.eos_token_id) == 1
    assert tok.decode(reply) == "Red.</s>"


def test_to_dict_of_a_conversation_reads_back_the_same(tmp_path):
    from paser.io.records import write_jsonl

    rec = Record("Q", "", "A", system="S", chat=True, later_turns=[{"role": "user", "content": "Q2"}])
    made = load_records(_write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]))[0]
    write_jsonl(tmp_path / "b.jsonl", [rec.to_dict(), made[0].to_dict()])
    back, _ = load_records(tmp_path / "b.jsonl")
    assert [r.id for r in back] == [rec.id, made[0].id] and back[0].system == "S" and back[0].later_turns == rec.later_turns
