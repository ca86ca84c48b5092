"""Tests for paser.score: token divergences against float64 numpy, and the scoring engine
against direct per-sample forwards on tiny random models (batching, caches, resume, shards)."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import magnitude_prune_, tiny_llama

from paser.errors import PaserError
from paser.io.models import LoadedModel, fingerprint_model
from paser.io.records import Record
from paser.io.templates import encode_example
from paser.score import divergence as dv
from paser.score import engine as eng

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- helpers


class CharTok:
    """A character-level tokenizer with the interface encode_example and the engine use."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + (ord(c) % 120) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def get_vocab(self):
        return {f"<{i}>": i for i in range(123)}


def magnitude_pruned(model: torch.nn.Module, frac: float = 0.5) -> torch.nn.Module:
    return magnitude_prune_(copy.deepcopy(model), frac)


def loaded(model, name) -> LoadedModel:
    return LoadedModel(model, CharTok(), "", fingerprint_model(model), name)


def make_records(n: int, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta sort these numbers classify the sentiment write a poem about cats".split()
    out = []
    for i in range(n):
        ins = " ".join(rng.choice(words, size=int(rng.integers(1, 6))))
        inp = " ".join(rng.choice(words, size=int(rng.integers(0, 3))))
        resp = " ".join(rng.choice(words, size=int(rng.integers(1, 12))))
        out.append(Record(instruction=f"{ins} {i}", input=inp, output=resp))
    return out


def direct_scores(orig, pruned, records, template, cutoff):
    """Reference: each sample alone, full model forward, full logits, then our token JSD."""
    tok = CharTok()
    res = {}
    with torch.inference_mode():
        for r in records:
            enc = encode_example(r, tok, template=template, cutoff=cutoff)
            ids = torch.tensor([enc.input_ids])
            lo = orig(input_ids=ids).logits[0]
            lp = pruned(input_ids=ids).logits[0]
            sl = slice(enc.n_prompt - 1, len(enc.input_ids) - 1)
            j = dv.token_jsd(lo[sl], lp[sl])
            labels = torch.tensor([enc.labels()])
            hf_loss = float(pruned(input_ids=ids, labels=labels).loss)
            res[r.id] = (float(j.mean()), hf_loss, enc.n_response, enc.n_prompt)
    return res


@pytest.fixture(scope="module")
def models():
    o = tiny_llama(128, seed=0, initializer_range=0.2, tie_word_embeddings=False)
    return loaded(o, "orig"), loaded(magnitude_pruned(o, 0.5), "pruned50"), loaded(magnitude_pruned(o, 0.3), "pruned30")


# ----------------------------------------------------------------------------- divergence maths


def np_jsd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 reference JSD per row from logits (−inf allowed)."""

    def softmax(x):
        x = x.astype(np.float64)
        m = np.max(x, axis=-1, keepdims=True)
        e = np.exp(x - m)
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(a), softmax(b)
    m = 0.5 * (p + q)

    def kl(x, y):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(x > 0, x * (np.log(x) - np.log(y)), 0.0)
        return t.sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_jsd_matches_numpy_random():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 101, generator=g) * 3
    b = torch.randn(37, 101, generator=g) * 3
    got = dv.token_jsd(a, b, chunk=8).numpy()
    np.testing.assert_allclose(got, np_jsd(a.numpy(), b.numpy()), rtol=1e-4, atol=1e-6)
    assert (got >= 0).all() and (got <= LN2).all()


def test_jsd_chunking_does_not_change_values():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, 64, generator=g), torch.randn(50, 64, generator=g)
    assert torch.equal(dv.token_jsd(a, b, chunk=1), dv.token_jsd(a, b, chunk=256))


def test_jsd_identical_is_zero_and_symmetric():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(9, 300, generator=g) * 10
    assert dv.token_jsd(a, a).abs().max() < 1e-6
    b = torch.randn(9, 300, generator=g) * 10
    torch.testing.assert_close(dv.token_jsd(a, b), dv.token_jsd(b, a), atol=1e-6, rtol=1e-5)


def test_jsd_disjoint_supports_is_ln2():
    ninf = float("-inf")
    a = torch.tensor([[0.0, 0.0, ninf, ninf], [5.0, ninf, ninf, ninf]])
    b = torch.tensor([[ninf, ninf, 1.0, 3.0], [ninf, ninf, ninf, 0.0]])
    got = dv.token_jsd(a, b)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, torch.full((2,), LN2), atol=1e-6, rtol=0)


def test_jsd_one_hot_and_neg_inf_logits():
    ninf = float("-inf")
    a = torch.tensor([[0.0, ninf, ninf], [1.0, 2.0, ninf], [ninf, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, ninf], [0.0, 0.0, ninf]])
    got = dv.token_jsd(a, b).numpy()
    ref = np_jsd(a.numpy(), b.numpy())
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert got[1] == pytest.approx(0.0, abs=1e-7)
    # one-hot vs uniform over 3: ½ln(3/2)·... computed exactly
    p, q = np.array([1, 0, 0.0]), np.ones(3) / 3
    m = (p + q) / 2
    exact = 0.5 * np.log(1 / m[0]) + 0.5 * np.sum(q * np.log(q / m))
    assert got[0] == pytest.approx(exact, abs=1e-6)


def test_jsd_very_peaked_and_huge_logits():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 200, generator=g) * 1e4
    b = torch.randn(6, 200, generator=g) * 1e4
    a[0] = b[0]
    got = dv.token_jsd(a, b)
    ref = np_jsd(a.numpy(), b.numpy())
    assert not torch.isnan(got).any()
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
    assert got[0] < 1e-6
    huge = torch.full((2, 10), 3e38)
    huge[0, 0] = 3.4e38
    assert torch.isfinite(dv.token_jsd(huge, torch.zeros(2, 10))).all()


def test_jsd_large_vocabulary():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(5, 50_000, generator=g) * 4
    b = a + torch.randn(5, 50_000, generator=g) * 0.5
    got = dv.token_jsd(a, b, chunk=2).numpy()
    np.testing.assert_allclose(got, np_jsd(a.numpy(), b.numpy()), rtol=2e-4, atol=1e-6)


def test_jsd_accepts_low_precision_logits():
    g = torch.Generator().manual_seed(5)
    a = (torch.randn(4, 64, generator=g) * 3).bfloat16()
    b = (torch.randn(4, 64, generator=g) * 3).bfloat16()
    got = dv.token_jsd(a, b)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), np_jsd(a.float().numpy(), b.float().numpy()), atol=1e-5)


def test_jsd_rejects_nan_and_bad_shapes():
    with pytest.raises(ValueError, match="NaN"):
        dv.token_jsd(torch.tensor([[float("nan"), 0.0]]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="NaN"):
        dv.token_jsd(torch.full((1, 3), float("-inf")), torch.zeros(1, 3))
    with pytest.raises(ValueError):
        dv.token_jsd(torch.zeros(2, 3), torch.zeros(2, 4))


def test_nll_matches_cross_entropy_and_numpy():
    g = torch.Generator().manual_seed(6)
    lo = torch.randn(20, 77, generator=g) * 5
    t = torch.randint(0, 77, (20,), generator=g)
    got = dv.token_nll(lo, t, chunk=3)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(lo, t, reduction="none"), atol=1e-5, rtol=1e-5)
    x = lo.double().numpy()
    ref = -(x[np.arange(20), t.numpy()] - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) - x.max(1))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)
    j, n1, n2 = dv.token_jsd_and_nll(lo, lo * 0.5, t)
    torch.testing.assert_close(n1, got)
    torch.testing.assert_close(n2, dv.token_nll(lo * 0.5, t))
    # a target with −inf logit: a finite (huge) loss, not inf/NaN
    lo2 = torch.zeros(1, 4)
    lo2[0, 2] = float("-inf")
    assert torch.isfinite(dv.token_nll(lo2, torch.tensor([2]))).all()


def test_response_positions_and_gather():
    lengths, n_prompt = torch.tensor([5, 3]), torch.tensor([2, 2])
    rows, cols = dv.response_positions(lengths, n_prompt)
    assert rows.tolist() == [0, 0, 0, 1] and cols.tolist() == [1, 2, 3, 1]
    ids = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 0, 0]])
    h = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)
    vals, tg = dv.gather_response(h, ids, lengths, n_prompt)
    assert vals[:, 0].tolist() == [1, 2, 3, 6] and tg.tolist() == [12, 13, 14, 22]
    with pytest.raises(ValueError):
        dv.response_positions(torch.tensor([3]), torch.tensor([0]))


def test_segment_mean():
    v = torch.tensor([1.0, 3.0, 5.0, 10.0])
    assert dv.segment_mean(v, [3, 0, 1]).tolist() == [3.0, 0.0, 10.0]


def test_plan_batches_respects_budget_and_covers_all():
    lengths = sorted([3, 5, 5, 8, 9, 20, 40, 41, 100])
    batches = eng.plan_batches(lengths, max_batch_tokens=40)
    covered = [i for s, e in batches for i in range(s, e)]
    assert covered == list(range(len(lengths)))
    for s, e in batches:
        assert (e - s) * lengths[e - 1] <= 40 or e - s == 1
    assert (len(lengths) - 1, len(lengths)) in batches  # 100 > budget: alone
    assert len(eng.plan_batches(lengths, 10_000, max_batch_size=4)) == 3
    with pytest.raises(ValueError):
        eng.plan_batches([5, 3])


def test_plan_batches_limits_padding():
    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(40, 257, size=200)).tolist()
    batches = eng.plan_batches(lengths, max_batch_tokens=4096, overhead_tokens=128)
    padded = sum((e - s) * lengths[e - 1] for s, e in batches)
    assert padded < 1.1 * sum(lengths)  # greedy filling to the budget padded ~2x on such data
    assert len(batches) < 40  # and batches stay large enough to keep GEMMs efficient
    # the DP is optimal: no cheaper split exists than the one found, e.g. vs one batch per sample
    cost = lambda bs: sum(128 + (e - s) * lengths[e - 1] for s, e in bs)  # noqa: E731
    assert cost(batches) <= cost([(i, i + 1) for i in range(200)])


# ----------------------------------------------------------------------------- engine


def test_degradation_matches_direct_per_sample(models, tmp_path):
    orig, pr, _ = models
    recs = make_records(24)
    res = eng.score_degradation(orig, pr, recs, "plain", 64, tmp_path, max_batch_tokens=256, progress=False)
    ref = direct_scores(orig.model, pr.model, recs, "plain", 64)
    assert len(res) == 24 and res.complete
    for k, r in enumerate(recs):
        j, loss, nr, npmt = ref[r.id]
        assert res.jsd[k] == pytest.approx(j, abs=2e-6)
        assert res.nll_pruned[k] == pytest.approx(loss, abs=2e-5)
        assert (res.n_response[k], res.n_prompt[k]) == (nr, npmt)
    assert res.jsd.mean() > 0.01  # the pruned model does differ: a test that can fail
    d = res.as_dict()
    assert d[recs[0].id][1:] == (ref[recs[0].id][2], ref[recs[0].id][3])


def test_alpaca_template_and_duplicates(models, tmp_path):
    orig, pr, _ = models
    recs = make_records(4)
    recs = recs + [recs[1]]  # a duplicate id is scored once and reported per row
    res = eng.score_degradation(orig, pr, recs, "alpaca", 256, tmp_path, progress=False)
    assert res.stats.samples_scored == 4 and res.jsd[1] == res.jsd[4]
    ref = direct_scores(orig.model, pr.model, recs[:4], "alpaca", 256)
    for k, r in enumerate(recs[:4]):
        assert res.jsd[k] == pytest.approx(ref[r.id][0], abs=2e-6)


def test_scores_do_not_depend_on_batching(models, tmp_path):
    orig, pr, _ = models
    recs = make_records(20, seed=1)
    one = eng.score_degradation(orig, pr, recs, "plain", 64, tmp_path / "a", max_batch_tokens=1, progress=False)
    big = eng.score_degradation(orig, pr, recs, "plain", 64, tmp_path / "b", max_batch_tokens=8192, progress=False)
    assert one.stats.batches == 20 and big.stats.batches == 1
    # float reduction order only: measured ~1e-7 here
    assert np.abs(one.jsd - big.jsd).max() < 1e-5
    assert np.abs(one.nll_pruned - big.nll_pruned).max() < 1e-4


def test_original_is_not_rerun_for_a_second_variant(models, tmp_path):
    orig, pr50, pr30 = models
    recs = make_records(12, seed=2)
    a = eng.score_degradation(orig, pr50, recs, "plain", 64, tmp_path, max_batch_tokens=200, progress=False)
    assert a.stats.original_forward_samples == 12
    b = eng.score_degradation(orig, pr30, recs, "plain", 64, tmp_path, max_batch_tokens=200, progress=False)
    assert b.stats.original_forward_samples == 0 and b.stats.samples_scored == 12
    ref = direct_scores(orig.model, pr30.model, recs, "plain", 64)
    np.testing.assert_allclose(b.jsd, [ref[r.id][0] for r in recs], atol=2e-6)
    np.testing.assert_allclose(b.nll_original, a.nll_original, atol=1e-6)
    assert b.jsd.mean() < a.jsd.mean()  # 30 % pruning hurts less than 50 %
    # a full re-run reads everything from the cache
    c = eng.score_degradation(orig, pr30, recs, "plain", 64, tmp_path, max_batch_tokens=200, progress=False)
    assert c.stats.samples_scored == 0 and np.array_equal(c.jsd, b.jsd)


def test_float16_hidden_cache_error_is_small(models, tmp_path):
    orig, pr, _ = models
    recs = make_records(10, seed=3)
    f32 = eng.score_degradation(orig, pr, recs, "plain", 64, tmp_path, hidden_dtype="float32", progress=False)
    f16 = eng.score_degradation(orig, pr, recs, "plain", 64, tmp_path, hidden_dtype="float16", progress=False)
    err = np.abs(f32.jsd - f16.jsd).max()
    assert 0 < err < 1e-3
    again = eng.score_degradation(orig, pr, recs, "plain", 64, tmp_path / "x", hidden_dtype="float16", progress=False)
    assert np.array_equal(again.jsd, f16.jsd)  # fresh values are rounded like cached ones
    with pytest.raises(PaserError):
        eng.score_degradation(orig, pr, recs, "plain", 64, tmp_path, hidden_dtype="int8", progress=False)


def test_sharded_ranks_fill_one_store(models, tmp_path):
    orig, pr, _ = models
    recs = make_records(15, seed=4)
    r0 = eng.score_degradation(orig, pr, recs, "plain", 64, tmp_path, world_size=2, rank=0, progress=False)
    assert not r0.complete and 0 < r0.stats.samples_scored < 15
    r1 = eng.score_degradation(orig, pr, recs, "plain", 64, tmp_path, world_size=2, rank=1, progress=False)
    assert r0.stats.samples_scored + r1.stats.samples_scored == 15 and r1.complete
    full = eng.score_degradation(orig, pr, recs, "plain", 64, tmp_path, progress=False)
    assert full.stats.samples_scored == 0
    single = eng.score_degradation(orig, pr, recs, "plain", 64, tmp_path / "single", progress=False)
    assert np.abs(full.jsd - single.jsd).max() < 1e-5
    with pytest.raises(PaserError):
        eng.score_degradation(orig, pr, recs, "plain", 64, tmp_path, world_size=2, rank=2, progress=False)


def test_score_loss_conditioned_and_unconditioned(models, tmp_path):
    orig, pr, _ = models
    recs = make_records(10, seed=5)
    cond = eng.score_loss(pr, recs, "plain", 64, tmp_path, condition_on_prompt=True, progress=False)
    unc = eng.score_loss(pr, recs, "plain", 64, tmp_path, condition_on_prompt=False, progress=False)
    tok = CharTok()
    with torch.inference_mode():
        for k, r in enumerate(recs):
            enc = encode_example(r, tok, template="plain", cutoff=64)
            ids = torch.tensor([enc.input_ids])
            want = float(pr.model(input_ids=ids, labels=torch.tensor([enc.labels()])).loss)
            assert cond.nll[k] == pytest.approx(want, abs=2e-5)
            y = torch.tensor([[tok.bos_token_id] + enc.input_ids[enc.n_prompt :]])
            want_y = float(pr.model(input_ids=y, labels=y.clone().index_fill_(1, torch.tensor([0]), -100)).loss)
            assert unc.nll[k] == pytest.approx(want_y, abs=2e-5)
    assert np.array_equal(cond.n_response, unc.n_response) and (unc.n_prompt == 1).all()
    ifd = cond.nll / unc.nll
    assert np.isfinite(ifd).all() and not np.allclose(ifd, 1.0)
    again = eng.score_loss(pr, recs, "plain", 64, tmp_path, condition_on_prompt=True, progress=False)
    assert again.stats.samples_scored == 0 and np.array_equal(again.nll, cond.nll)


def test_degradation_nll_matches_score_loss(models, tmp_path):
    orig, pr, _ = models
    recs = make_records(8, seed=6)
    d = eng.score_degradation(orig, pr, recs, "plain", 64, tmp_path, progress=False)
    lp = eng.score_loss(pr, recs, "plain", 64, tmp_path, progress=False)
    lo = eng.score_loss(orig, recs, "plain", 64, tmp_path, progress=False)
    np.testing.assert_allclose(d.nll_pruned, lp.nll, atol=1e-5)
    np.testing.assert_allclose(d.nll_original, lo.nll, atol=1e-5)


def test_softcapped_head_is_reproduced():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0, initializer_range=0.3,
    )
    m = Gemma2ForCausalLM(cfg).eval()
    view = eng.ModelView(m)
    assert view.softcap == 2.0
    item = eng.ScoreItem("x", tuple(range(3, 40)), 5)
    with torch.inference_mode():
        err = view.verify(item)
        logits = view.logits(view.hidden(torch.tensor([item.input_ids]))[0])
    assert err < 1e-5 and not view.direct
    assert logits.abs().max() <= 2.0 + 1e-6  # the cap is applied, else verify would have failed
    view.softcap = None  # without the cap the split no longer matches: verify must notice
    with torch.inference_mode():
        view.verified = False
        view.verify(item)
    assert view.direct


def test_user_errors(models, tmp_path):
    orig, pr, _ = models
    with pytest.raises(PaserError, match="template"):
        eng.score_degradation(orig, pr, make_records(2), "nonsense", 64, tmp_path, progress=False)
    with pytest.raises(PaserError, match="chat"):
        eng.score_loss(pr, make_records(2), "chat", 64, tmp_path, progress=False)


# ----------------------------------------------------------------------------- kill -9 and resume

_CHILD = r"""
import sys, time, json
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from transformers import LlamaForCausalLM
from paser.io.models import LoadedModel
from paser.io.records import load_records
from paser.score.engine import score_degradation
from test_score import CharTok
o = LlamaForCausalLM.from_pretrained({orig!r}).eval()
p = LlamaForCausalLM.from_pretrained({pruned!r}).eval()
p.register_forward_pre_hook(lambda *a: time.sleep(0.25))
recs, _ = load_records({records!r})
score_degradation(LoadedModel(o, CharTok(), "", "fo", "o"), LoadedModel(p, CharTok(), "", "fp", "p"),
                  recs, "plain", 64, {cache!r}, max_batch_tokens=120, flush_every=1, progress=False)
print("FINISHED")
"""


def test_sigkill_resume_gives_identical_results(models, tmp_path):
    from transformers import LlamaForCausalLM

    orig, pr, _ = models
    orig.model.save_pretrained(tmp_path / "o")
    pr.model.save_pretrained(tmp_path / "p")
    recs = make_records(40, seed=7)
    rec_path = tmp_path / "recs.jsonl"
    rec_path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in recs))
    cache = tmp_path / "cache"
    script = _CHILD.format(
        tests=str(Path(__file__).parent), orig=str(tmp_path / "o"), pruned=str(tmp_path / "p"),
        records=str(rec_path), cache=str(cache),
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store_glob = "scores/degradation/*/shard-*.parquet"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob(store_glob))) < 3 and child.poll() is None:
        time.sleep(0.05)
    assert child.poll() is None, child.communicate()[1].decode()[-2000:]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL

    from paser.io.cache import ShardStore
    from paser.io.records import load_records

    (store_dir,) = {p.parent for p in cache.glob(store_glob)}
    done = ShardStore(store_dir).done_ids()
    assert 0 < len(done) < 40

    torch.set_num_threads(1)  # as in the child: same kernels, same bits
    try:
        o = LlamaForCausalLM.from_pretrained(tmp_path / "o").eval()
        p = LlamaForCausalLM.from_pretrained(tmp_path / "p").eval()
        lo, lp = LoadedModel(o, CharTok(), "", "fo", "o"), LoadedModel(p, CharTok(), "", "fp", "p")
        recs2, _ = load_records(rec_path)
        resumed = eng.score_degradation(lo, lp, recs2, "plain", 64, cache, max_batch_tokens=120, flush_every=1, progress=False)
        fresh = eng.score_degradation(lo, lp, recs2, "plain", 64, tmp_path / "fresh", max_batch_tokens=120, progress=False)
    finally:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    assert resumed.stats.samples_scored == 40 - len(done)  # cached ids were not rescored
    assert resumed.stats.original_forward_samples <= 40 - len(done)
    assert np.array_equal(resumed.jsd, fresh.jsd)
    assert np.array_equal(resumed.nll_pruned, fresh.nll_pruned)
    assert ShardStore(store_dir).done_ids() == {r.id for r in recs2}


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_real_smollm2_engine_matches_direct(tmp_path):
    from paser.io.models import load_model

    lm = load_model("smollm2-135m")
    pr = LoadedModel(magnitude_pruned(lm.model, 0.5), lm.tokenizer, "", "", "mag50")
    pr.fingerprint = fingerprint_model(pr.model)
    recs = [
        Record("Name three primary colors.", "", "Red, blue and yellow."),
        Record("Add the numbers.", "2 and 3", "2 + 3 = 5."),
        Record("Write a haiku about rain.", "", "Soft rain on the roof\nwhispers to the sleeping town\nuntil the dawn comes."),
    ]
    res = eng.score_degradation(lm, pr, recs, "alpaca", 256, tmp_path, progress=False)
    with torch.inference_mode():
        for k, r in enumerate(recs):
            enc = encode_example(r, lm.tokenizer, template="alpaca", cutoff=256)
            ids = torch.tensor([enc.input_ids])
            sl = slice(enc.n_prompt - 1, len(enc.input_ids) - 1)
            j = dv.token_jsd(lm.model(input_ids=ids).logits[0, sl], pr.model(input_ids=ids).logits[0, sl]).mean()
            assert res.jsd[k] == pytest.approx(float(j), abs=1e-5)
    assert 0.02 < res.jsd.mean() < LN2
    f16 = eng.score_degradation(lm, pr, recs, "alpaca", 256, tmp_path, hidden_dtype="float16", progress=False)
    assert np.abs(f16.jsd - res.jsd).max() < 1e-3
