"""Distillation recovery (--objective kd | sft+kd): the bucketed KL, the teacher cache, the
training loss, resume, and sft+kd at weight 0. Tiny random LLaMAs, seconds each."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import save_dense_and_sparse, tiny_llama
from test_recover import _StepCounter, _adapter_tensors, _Crash, _crash_at, _records, _tokenizer

from paser.errors import PaserError
from paser.recover import encode_records, recover
from paser.recover.distill import (
    META_FILE,
    TOPK_FILE,
    bucketed_kl,
    full_kl,
    open_or_build_teacher_targets,
    teacher_cache_key,
    teacher_topk,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tok):
    """(dense teacher dir, 50 %-sparse student dir) of the same tiny LLaMA.

    A 10x LM head gives the tiny random model peaked distributions (a default head puts every
    logit near 0, so any top-k would look like the whole vocabulary)."""
    return save_dense_and_sparse(tmp_path_factory.mktemp("kd_models"), tok, head_scale=10)


# ----------------------------------------------------------------------------- the maths


def _direct_bucketed(t_logits, s_logits, k, T):
    """The k + 1 bucket KL written out in float64, one row at a time."""
    out = []
    for t, s in zip(t_logits.double(), s_logits.double()):
        p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
        top = torch.argsort(p, descending=True)[:k]
        kl = sum(float(p[i] * (p[i].log() - q[i].log())) for i in top)
        p_tail, q_tail = 1 - float(p[top].sum()), 1 - float(q[top].sum())
        if k < len(p):  # k = V: no tail bucket (1 - Σ would be rounding noise)
            kl += p_tail * (torch.tensor(p_tail).log() - torch.tensor(q_tail).log()).item()
        out.append(kl)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("k,T", [(1, 1.0), (7, 1.0), (7, 2.5), (50, 0.7)])
def test_bucketed_kl_equals_direct_computation(k, T):
    g = torch.Generator().manual_seed(k)
    t_logits = 3 * torch.randn(6, 50, generator=g)
    s_logits = 3 * torch.randn(6, 50, generator=g)
    idx, logp, tail = teacher_topk(t_logits, k, T)
    got = bucketed_kl(idx, logp, tail, s_logits, T)
    torch.testing.assert_close(got.double(), _direct_bucketed(t_logits, s_logits, k, T), rtol=1e-4, atol=1e-5)
    full = full_kl(t_logits, s_logits, T)
    assert (got <= full + 1e-5).all()  # grouping the tail can only lose divergence
    if k == 50:  # k = V: one empty tail bucket, the exact full-vocabulary KL
        ref = torch.nn.functional.kl_div(
            torch.log_softmax(s_logits / T, -1), torch.log_softmax(t_logits / T, -1), log_target=True, reduction="none"
        ).sum(-1)
        torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-6)
        assert (tail == 0).all()


def test_bucketed_kl_is_finite_when_the_student_has_no_tail():
    # The student puts all its float32 mass on the teacher's top-2: 1 - Σ q would be 0 or
    # negative; the masked logsumexp keeps the tail term exact and the gradient finite.
    t_logits = torch.tensor([[4.0, 3.0, 0.0, 0.0, 0.0]])
    s_logits = torch.tensor([[60.0, 59.0, -60.0, -60.0, -60.0]], requires_grad=True)
    idx, logp, tail = teacher_topk(t_logits, 2)
    kl = bucketed_kl(idx, logp, tail, s_logits)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(s_logits.grad).all()
    # by hand in float64: log q_tail = logsumexp(tail logits) - logsumexp(all logits) ≈ -119
    s = s_logits.detach()[0].double()
    p = torch.softmax(t_logits[0].double(), -1)
    log_q = s - torch.logsumexp(s, 0)
    log_q_tail = torch.logsumexp(s[2:], 0) - torch.logsumexp(s, 0)
    p_tail = p[2:].sum()
    expect = (p[:2] * (p[:2].log() - log_q[:2])).sum() + p_tail * (p_tail.log() - log_q_tail)
    assert float(kl.detach()) == pytest.approx(float(expect), rel=1e-4)
    assert float(log_q_tail) < -100  # 1 - Σ q in float32 would be exactly 0 here


# ----------------------------------------------------------------------------- the teacher cache


def _key(examples, ids, k=5, T=1.0, fp="fp"):
    return teacher_cache_key(
        teacher_fingerprint=fp, teacher_dtype="torch.float32", ids=ids, examples=examples, template="alpaca",
        cutoff=256, k=k, temperature=T, tokenizer_key="tok",
    )  # fmt: skip


def test_cached_teacher_equals_a_fresh_forward(tmp_path, tok, model_dirs, caplog):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(model_dirs[0]).eval()
    ds = encode_records(_records(7), tok, "alpaca", 256)
    key = _key(ds.examples, ds.ids, k=5, T=1.5)
    calls = []

    def load():
        calls.append(1)
        return dense

    entry = tmp_path / "teacher" / "e"
    targets, built = open_or_build_teacher_targets(entry, key, ds.examples, len(tok), load)
    assert built and calls == [1]
    for i, ex in enumerate(ds.examples):  # one unpadded forward per example, the reference
        ids = torch.tensor([ex["input_ids"]])
        n_prompt = sum(1 for t in ex["labels"] if t == -100)
        with torch.no_grad():
            logits = dense(input_ids=ids).logits[0, n_prompt - 1 : -1]
        idx, logp, tail = teacher_topk(logits, 5, 1.5)
        c_idx, c_logp, c_tail = targets.rows(i)
        assert c_idx.shape == (len(ex["input_ids"]) - n_prompt, 5)
        torch.testing.assert_close(c_logp, logp, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c_tail, tail, rtol=1e-4, atol=1e-6)
        assert torch.equal(c_idx.long(), idx)
        assert float(tail.min()) > 0  # the tail bucket really holds mass here

    # A second open reads the file and never loads the teacher.
    again, built = open_or_build_teacher_targets(entry, key, ds.examples, len(tok), load)
    assert not built and calls == [1]
    torch.testing.assert_close(again.rows(3)[1], targets.rows(3)[1])

    # A flipped byte fails the checksum: dropped with a warning and rebuilt.
    blob = bytearray((entry / TOPK_FILE).read_bytes())
    blob[-5] ^= 0xFF
    (entry / TOPK_FILE).write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING):
        _, built = open_or_build_teacher_targets(entry, key, ds.examples, len(tok), load)
    assert built and calls == [1, 1] and "checksum" in caplog.text
    # Tampered values with a matching checksum (a buggy writer) fail the range checks.
    from safetensors.torch import load_file, save

    t = load_file(str(entry / TOPK_FILE))
    t["logp"][0, 0] = 3.0
    blob = save(t)
    (entry / TOPK_FILE).write_bytes(blob)
    meta = json.loads((entry / META_FILE).read_text())
    meta["sha256"] = __import__("hashlib").sha256(blob).hexdigest()
    (entry / META_FILE).write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, built = open_or_build_teacher_targets(entry, key, ds.examples, len(tok), load)
    assert built and "above 0" in caplog.text
    # Another key (here: other k) in the same entry is not taken for this one.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, built = open_or_build_teacher_targets(entry, _key(ds.examples, ds.ids, k=6), ds.examples, len(tok), load)
    assert built and "key does not match" in caplog.text


def test_cache_key_names_everything_it_depends_on(tok):
    ds = encode_records(_records(4), tok, "alpaca", 256)
    base = _key(ds.examples, ds.ids)
    short = encode_records(_records(4), tok, "alpaca", 40)
    assert _key(short.examples, short.ids) != base  # a cut changes the tokens, not the ids
    assert _key(ds.examples, ds.ids, T=2.0) != base
    assert _key(ds.examples, ds.ids, fp="other") != base
    assert _key(ds.examples, ds.ids[::-1]) != base


# ----------------------------------------------------------------------------- training


KW = dict(lr=5e-3, batch_size=4, seed=3, show_progress=False)


def test_kd_training_loss_is_the_kl_from_teacher_to_pruned(tmp_path, tok, model_dirs):
    """Step 1's logged loss (LoRA B = 0, so the student is the pruned model) equals T²·KL by hand."""
    from transformers import AutoModelForCausalLM

    dense_dir, sparse_dir = model_dirs
    recs = _records(5)
    T, k = 2.0, 8
    rep = recover(
        str(sparse_dir), recs, tmp_path / "o", objective="kd", teacher=str(dense_dir), kd_temperature=T, kd_topk=k,
        max_steps=1, cache_dir=tmp_path / "cache", **{**KW, "batch_size": 5},
    )  # fmt: skip
    assert rep["objective"] == "kd" and rep["kd"]["topk"] == k and rep["kd"]["temperature"] == T
    assert rep["kd"]["teacher_cache_built"] is True
    assert (tmp_path / "cache" / "teacher" / rep["kd"]["teacher_cache"] / META_FILE).exists()
    logged = json.loads((tmp_path / "o" / "training_log.json").read_text())["train"][0]["loss"]

    t_model = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    s_model = AutoModelForCausalLM.from_pretrained(sparse_dir).eval()
    kl_sum, n = 0.0, 0
    for ex in encode_records(recs, tok, "alpaca", 256).examples:
        ids = torch.tensor([ex["input_ids"]])
        p = sum(1 for t in ex["labels"] if t == -100)
        with torch.no_grad():
            t_log, s_log = t_model(input_ids=ids).logits[0, p - 1 : -1], s_model(input_ids=ids).logits[0, p - 1 : -1]
        kl_sum += float(_direct_bucketed(t_log, s_log, k, T).sum())
        n += t_log.shape[0]
    # The KL is ~1e-4 nats here, a difference of nearly equal log-probabilities: float32 forwards
    # (batched in training, one by one here) agree to ~2e-4 of it (measured against float64).
    assert logged == pytest.approx(T * T * kl_sum / n, rel=2e-3)
    assert logged > 0


def test_sft_plus_kd_at_weight_zero_is_sft(tmp_path, model_dirs):
    dense_dir, sparse_dir = model_dirs
    recs = _records(8)
    sft = recover(str(sparse_dir), recs, tmp_path / "sft", max_steps=3, **KW)
    mix = recover(
        str(sparse_dir), recs, tmp_path / "mix", max_steps=3, objective="sft+kd", kd_weight=0.0, teacher=str(dense_dir),
        kd_topk=4, cache_dir=tmp_path / "cache", **KW,
    )  # fmt: skip
    assert sft["objective"] == "sft" and sft["kd"] is None and mix["kd"]["weight"] == 0.0
    la = [e["loss"] for e in json.loads((tmp_path / "sft" / "training_log.json").read_text())["train"]]
    lb = [e["loss"] for e in json.loads((tmp_path / "mix" / "training_log.json").read_text())["train"]]
    assert la == pytest.approx(lb, rel=1e-6)
    a, b = _adapter_tensors(tmp_path / "sft"), _adapter_tensors(tmp_path / "mix")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)
    # ...while a real weight changes the result (the KD term is live in the mix)
    half = recover(
        str(sparse_dir), recs, tmp_path / "half", max_steps=3, objective="sft+kd", kd_weight=0.5, teacher=str(dense_dir),
        kd_topk=4, cache_dir=tmp_path / "cache", **KW,
    )  # fmt: skip
    assert half["kd"]["teacher_cache_built"] is False  # same records, k, T, teacher: the cache is reused
    lc = [e["loss"] for e in json.loads((tmp_path / "half" / "training_log.json").read_text())["train"]]
    assert abs(lc[0] - la[0]) > 1e-3


def test_resumed_kd_run_equals_an_uninterrupted_one(tmp_path, model_dirs):
    dense_dir, sparse_dir = model_dirs
    recs = _records(12)
    kw = dict(epochs=2, save_steps=2, objective="kd", teacher=str(dense_dir), kd_topk=6, kd_temperature=1.5,
              cache_dir=tmp_path / "cache", **KW)  # fmt: skip  (6 steps)
    straight = recover(str(sparse_dir), recs, tmp_path / "a", **kw)
    assert straight["training"]["steps"] == 6
    with pytest.raises(_Crash):
        recover(str(sparse_dir), recs, tmp_path / "b", callbacks=[_crash_at(3)], **kw)
    # the run key holds the objective and its options: another temperature is another run
    with pytest.raises(PaserError, match="different run"):
        recover(str(sparse_dir), recs, tmp_path / "b", **{**kw, "kd_temperature": 1.0})
    with pytest.raises(PaserError, match="different run"):
        recover(str(sparse_dir), recs, tmp_path / "b", **{**kw, "objective": "sft+kd"})
    counter = _StepCounter()
    resumed = recover(str(sparse_dir), recs, tmp_path / "b", callbacks=[counter], **kw)
    assert counter.steps == [3, 4, 5, 6] and resumed["training"]["resumed_from_step"] == 2
    a, b = _adapter_tensors(tmp_path / "a"), _adapter_tensors(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    la = [e["loss"] for e in json.loads((tmp_path / "a" / "training_log.json").read_text())["train"]]
    lb = [e["loss"] for e in json.loads((tmp_path / "b" / "training_log.json").read_text())["train"]]
    assert la == pytest.approx(lb, rel=1e-5)
    # the merge keeps the pruned zeros under kd as under sft
    assert resumed["sparsity"]["after_merge"] == pytest.approx(resumed["sparsity"]["before"])
    assert resumed["sparsity"]["entries_reset_to_zero"] > 0


def test_kd_with_validation_logs_the_response_cross_entropy(tmp_path, model_dirs):
    dense_dir, sparse_dir = model_dirs
    kw = dict(max_steps=2, val_fraction=0.25, teacher=str(dense_dir), kd_topk=4, cache_dir=tmp_path / "cache", **KW)
    kd = recover(str(sparse_dir), _records(8), tmp_path / "kd", objective="kd", **kw)
    sft = recover(str(sparse_dir), _records(8), tmp_path / "sft", objective="sft", **kw)
    assert kd["loss"]["initial_val"] == pytest.approx(sft["loss"]["initial_val"], rel=1e-6)  # both: CE before training


def test_kd_user_errors(tmp_path, model_dirs, tok):
    dense_dir, sparse_dir = model_dirs
    with pytest.raises(PaserError, match="objective must be one of"):
        recover(str(sparse_dir), _records(3), tmp_path, objective="distil")
    with pytest.raises(PaserError, match="kd_weight"):
        recover(str(sparse_dir), _records(3), tmp_path, objective="sft+kd", kd_weight=1.5)
    other = tiny_llama(len(tok) + 8, tie_word_embeddings=False)  # a padded vocabulary
    other.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    with pytest.raises(PaserError, match="predicts"):
        recover(str(sparse_dir), _records(3), tmp_path / "o", objective="kd", teacher=str(tmp_path / "t"),
                max_steps=1, cache_dir=tmp_path / "c", show_progress=False)  # fmt: skip


def test_kd_from_cli_and_pipeline_args(tmp_path, model_dirs):
    from paser.cli import _args_for, build_parser, main
    from paser.config import RecoverArgs, build_args
    from paser.io.records import write_jsonl

    dense_dir, sparse_dir = model_dirs
    data = tmp_path / "sel.jsonl"
    write_jsonl(data, [r.to_dict() for r in _records(4)])
    argv = ["recover", "--model", str(sparse_dir), "--data", str(data), "--out", str(tmp_path / "o"), "--objective", "sft+kd",
            "--kd-weight", "0.3", "--kd-temperature", "2", "--kd-topk", "4", "--teacher", str(dense_dir), "--max-steps", "1",
            "--batch-size", "2", "--cache-dir", str(tmp_path / "cache"), "--save-dtype", "bfloat16"]  # fmt: skip
    a = _args_for(RecoverArgs, build_parser().parse_args(argv))
    assert (a.objective, a.kd_weight, a.kd_temperature, a.kd_topk, a.save_dtype) == ("sft+kd", 0.3, 2.0, 4, "bfloat16")
    y = build_args(RecoverArgs, {"objective": "kd", "kd_topk": 16, "teacher": "x"})  # a pipeline `recover:` section
    assert (y.objective, y.kd_topk, y.teacher) == ("kd", 16, "x")
    assert main(argv) == 0
    rep = json.loads((tmp_path / "o" / "recovery_report.json").read_text())
    assert rep["objective"] == "sft+kd" and rep["kd"]["weight"] == 0.3 and rep["save_dtype"] == "bfloat16"
    assert rep["kd"]["teacher_cache_dir"].startswith(str(tmp_path / "cache" / "teacher"))
    assert main([*argv[:-2], "--objective", "kd", "--kd-topk", "0"]) == 2  # a user error: one line, exit 2


def test_bucketed_kl_mixes_exact_and_fast_tail_rows():
    # One batch with a row whose student keeps > 99 % on the teacher's top-k (exact tail path)
    # and ordinary rows (tail from the kept mass): each equals its row computed alone.
    g = torch.Generator().manual_seed(0)
    t_logits = 3 * torch.randn(4, 40, generator=g)
    s_logits = 3 * torch.randn(4, 40, generator=g)
    idx, logp, tail = teacher_topk(t_logits, 3)
    s_logits[1] = -30.0
    s_logits[1, idx[1]] = 30.0  # row 1: nearly all student mass on the kept tokens
    s = s_logits.clone().requires_grad_(True)
    kl = bucketed_kl(idx, logp, tail, s)
    kl.sum().backward()
    assert torch.isfinite(s.grad).all()
    for r in range(4):
        alone = bucketed_kl(idx[r : r + 1], logp[r : r + 1], tail[r : r + 1], s_logits[r : r + 1])
        assert float(kl[r]) == pytest.approx(float(alone), rel=1e-5)
    ref = _direct_bucketed(t_logits[[0, 2, 3]], s_logits[[0, 2, 3]], 3, 1.0)
    torch.testing.assert_close(kl.detach()[[0, 2, 3]].double(), ref, rtol=1e-4, atol=1e-5)
    # row 1 by hand in float64, with log q_tail taken from the non-kept logits (≈ -60 + log 37)
    row, keep = s_logits[1].double(), idx[1]
    rest = torch.ones(40, dtype=torch.bool)
    rest[keep] = False
    p = torch.softmax(t_logits[1].double(), -1)
    log_q = row - torch.logsumexp(row, 0)
    log_q_tail = torch.logsumexp(row[rest], 0) - torch.logsumexp(row, 0)
    p_tail = p[rest].sum()
    expect = (p[keep] * (p[keep].log() - log_q[keep])).sum() + p_tail * (p_tail.log() - log_q_tail)
    assert float(kl[1]) == pytest.approx(float(expect), rel=1e-4)
    assert float(log_q_tail) < -50


def test_kd_loss_is_normalised_over_the_accumulated_batch(tmp_path, model_dirs):
    """batch 2 × grad_accum 2 and batch 4 × 1 see the same 4 records in step 1 (LoRA B = 0, so
    the student is the pruned model): the logged KD loss must be the same token mean."""
    dense_dir, sparse_dir = model_dirs
    kw = dict(max_steps=1, objective="kd", teacher=str(dense_dir), kd_topk=6, cache_dir=tmp_path / "cache",
              lr=5e-3, seed=3, show_progress=False)  # fmt: skip
    recover(str(sparse_dir), _records(4), tmp_path / "a", batch_size=4, grad_accum=1, **kw)
    recover(str(sparse_dir), _records(4), tmp_path / "b", batch_size=2, grad_accum=2, **kw)
    la = json.loads((tmp_path / "a" / "training_log.json").read_text())["train"][0]["loss"]
    lb = json.loads((tmp_path / "b" / "training_log.json").read_text())["train"][0]["loss"]
    assert la == pytest.approx(lb, rel=1e-4)
