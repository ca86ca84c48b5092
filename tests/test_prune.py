"""Pruning: the maths against direct computations, the driver on a tiny random LLaMA, one real-model check."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from conftest import tiny_llama

from paser.errors import PaserError
from paser.prune import decoder_layers, load_calibration, prune_model, save_pruned
from paser.prune.calibration import tokenize_calibration
from paser.prune.driver import _run_layer, capture_layer_inputs, layer_linears
from paser.prune.magnitude import magnitude_mask
from paser.prune.masks import lowest_mask, nm_mask, parse_pattern, zero_fraction
from paser.prune.sparsegpt import sparsegpt_prune, update_hessian
from paser.prune.structured import (
    head_group_importance,
    mlp_channel_importance,
    plan_structured,
    reconstruct_kept_columns,
)
from paser.prune.wanda import update_column_sq_norms, wanda_mask

# ----------------------------------------------------------------------------- fixtures


def tiny_model(layers: int = 2, seed: int = 0) -> transformers.LlamaForCausalLM:
    return tiny_llama(128, seed, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, max_position_embeddings=128)


class CharTokenizer:
    """Enough of a tokenizer for calibration: one id per character, BOS first."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=True, truncation=False, max_length=None):
        ids = ([1] if add_special_tokens else []) + [3 + ord(c) % 120 for c in text]
        return {"input_ids": ids[:max_length] if truncation and max_length else ids}


TEXTS = [f"calibration sample {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(4)]


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features and a few large-magnitude channels, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5
    x[:, :4] *= 8.0
    return x


# ----------------------------------------------------------------------------- masks and patterns


def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern(" 4 : 8 ") == (4, 8)
    assert parse_pattern(None) is None and parse_pattern("unstructured") is None
    for bad in ("4:2", "2-4", "0:4", "2:2"):
        with pytest.raises(ValueError):
            parse_pattern(bad)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_magnitude_per_layer_threshold(sparsity):
    w = torch.randn(48, 64)
    mask = magnitude_mask(w, sparsity)
    assert abs(mask.float().mean().item() - sparsity) < 0.005
    # one threshold over the whole matrix: every pruned |w| is below every kept |w|
    assert w.abs()[mask].max() <= w.abs()[~mask].min()


def test_lowest_mask_per_row_counts():
    s = torch.rand(10, 64)
    mask = lowest_mask(s, 0.25, per_row=True)
    assert (mask.sum(1) == 16).all()


def test_nm_mask_exactly_two_of_four():
    s = torch.rand(8, 32)
    mask = nm_mask(s, 2, 4)
    assert (mask.reshape(8, 8, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError):
        nm_mask(torch.rand(4, 30), 2, 4)


# ----------------------------------------------------------------------------- Wanda


def test_wanda_mask_equals_direct_computation():
    torch.manual_seed(1)
    w = torch.randn(16, 32)
    x = correlated_inputs(200, 32)
    acc = update_column_sq_norms(None, x[:120])
    acc = update_column_sq_norms(acc, x[120:].reshape(2, 40, 32))  # batched shapes accumulate the same
    assert torch.allclose(acc, (x * x).sum(0), rtol=1e-5)
    mask = wanda_mask(w, acc, 0.5)
    direct = torch.zeros_like(mask)
    norms = x.norm(dim=0)
    for i in range(w.shape[0]):
        score = [abs(w[i, j].item()) * norms[j].item() for j in range(w.shape[1])]
        for j in sorted(range(w.shape[1]), key=score.__getitem__)[:16]:
            direct[i, j] = True
    assert torch.equal(mask, direct)
    # Wanda differs from magnitude on this data: the activation norms matter
    assert not torch.equal(mask, lowest_mask(w.abs(), 0.5, per_row=True))


# ----------------------------------------------------------------------------- SparseGPT


def test_hessian_running_mean_matches_direct():
    x = torch.randn(300, 24)
    h, n = update_hessian(None, 0, x[:100])
    h, n = update_hessian(h, n, x[100:])
    assert n == 300
    assert torch.allclose(h, 2 * x.T @ x / 300, atol=1e-5)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstruction_beats_magnitude_and_wanda(nm):
    torch.manual_seed(2)
    w = torch.randn(32, 128)
    x = correlated_inputs(1024, 128)
    h, _ = update_hessian(None, 0, x)
    new_w, mask = sparsegpt_prune(w, h, 0.5, nm, blocksize=32)
    assert torch.equal(new_w == 0, mask)
    if nm:
        assert (mask.reshape(32, 32, 4).sum(-1) == 2).all()
    else:
        assert abs(mask.float().mean().item() - 0.5) < 0.005

    def err(wp):
        return ((w - wp) @ x.T).pow(2).sum().item()

    mag = w.masked_fill(magnitude_mask(w, 0.5, nm), 0)
    wan = w.masked_fill(wanda_mask(w, (x * x).sum(0), 0.5, nm), 0)
    assert err(new_w) < err(wan) < err(mag)
    assert err(new_w) < 0.8 * err(wan)


# ----------------------------------------------------------------------------- structured maths


def test_head_group_importance_groups_queries_with_their_kv_head():
    n_kv, n_rep, hd, d = 2, 2, 4, 8
    q = torch.zeros(n_kv * n_rep * hd, d)
    k = torch.zeros(n_kv * hd, d)
    v = torch.zeros(n_kv * hd, d)
    o = torch.zeros(d, n_kv * n_rep * hd)
    q[2 * hd : 3 * hd] = 1.0  # query head 2 reads KV head 1 (heads 2, 3 -> group 1)
    s = head_group_importance(q, k, v, o, n_kv, hd, "magnitude")
    assert s[0] == 0 and s[1] > 0
    o_sq = torch.zeros(n_kv * n_rep * hd)
    o[:, :hd] = 1.0
    o_sq[:hd] = 4.0  # head 0 (group 0) is active and writes out
    s = head_group_importance(q, k, v, o, n_kv, hd, "activation", o_in_sq_norms=o_sq)
    assert s[0] > 0 and s[1] == 0


def test_mlp_channel_importance_activation_is_norm_product():
    gate, up, down = torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6)
    sq = torch.rand(6)
    s = mlp_channel_importance(gate, up, down, "activation", down_in_sq_norms=sq)
    assert torch.allclose(s, sq.sqrt() * down.norm(dim=0))
    g = (torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6))
    t = mlp_channel_importance(gate, up, down, "taylor", grads=g)
    direct = (gate * g[0]).abs().sum(1) + (up * g[1]).abs().sum(1) + (down * g[2]).abs().sum(0)
    assert torch.allclose(t, direct)


def test_plan_structured_smollm2_shape():
    plan = plan_structured(576, 9, 3, 64, 1536, 0.25)
    assert plan.kv_groups_keep == 2  # 6 heads; 576 % 6 == 0 keeps the config valid
    assert abs(plan.block_sparsity - 0.25) < 0.002
    no_heads = plan_structured(576, 9, 3, 64, 1536, 0.25, prune_heads=False)
    assert no_heads.kv_groups_keep == 3 and abs(no_heads.block_sparsity - 0.25) < 0.002


def test_reconstruct_kept_columns_is_least_squares():
    torch.manual_seed(3)
    w = torch.randn(16, 40)
    x = correlated_inputs(800, 40)
    h, _ = update_hessian(None, 0, x)
    keep = torch.arange(0, 40, 2)
    refit = reconstruct_kept_columns(w, h, keep, percdamp=1e-6)
    direct = torch.linalg.lstsq(x[:, keep].double(), (x @ w.T).double()).solution.T.float()
    assert torch.allclose(refit, direct, atol=1e-3)

    def err(wk):
        return ((x[:, keep] @ wk.T) - x @ w.T).pow(2).sum().item()

    assert err(refit) < 0.9 * err(w[:, keep])
    full = reconstruct_kept_columns(w, h, torch.arange(40), percdamp=1e-6)  # nothing removed: same outputs
    assert ((x @ full.T) - x @ w.T).pow(2).sum() < 1e-5 * (x @ w.T).pow(2).sum()


# ----------------------------------------------------------------------------- calibration


def test_load_calibration_sources(tmp_path):
    from paser.data import pool_path
    from paser.io.records import load_records
    from paser.io.templates import render_prompt

    cal = load_calibration(None, 3)
    recs, _ = load_records(pool_path())
    assert cal.texts == [render_prompt(r) + r.output for r in recs[:3]]
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(f"paragraph {i} " + "x" * 600 for i in range(6)))
    assert len(load_calibration(txt, 10).texts) == 3  # paragraphs joined to >= 1000 characters
    jl = tmp_path / "r.jsonl"
    jl.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(5)))
    cal = load_calibration(jl, 2, seed=0)
    assert len(cal.texts) == 2 and all("### Response:" in t for t in cal.texts)
    assert load_calibration(["a", "b", "c"], 2).texts == ["a", "b"]
    with pytest.raises(PaserError):
        load_calibration(tmp_path / "missing.txt", 2)


# ----------------------------------------------------------------------------- driver


def test_sequential_capture_reproduces_the_model():
    m = tiny_model(3)
    ids = tokenize_calibration(TEXTS[:2], CharTokenizer(), 32)
    inputs = capture_layer_inputs(m, ids)
    for layer in decoder_layers(m):
        inputs = _run_layer(layer, inputs)
    with torch.no_grad():
        for (h, _), x in zip(inputs, ids):
            ref = m(input_ids=x, output_hidden_states=True).hidden_states[-1]
            assert torch.allclose(m.model.norm(h), ref, atol=1e-5)


def _untouched(before, after):
    return torch.equal(before.model.embed_tokens.weight, after.model.embed_tokens.weight) and torch.equal(
        before.lm_head.weight, after.lm_head.weight
    )


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_unstructured_methods_reach_sparsity(method, pattern):
    m = tiny_model()
    ref = copy.deepcopy(m)
    rep = prune_model(m, CharTokenizer(), method, 0.5, pattern, calibration=TEXTS, seq_len=48, show_progress=False)
    assert _untouched(ref, m)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # still tied
    linears = [lin for layer in decoder_layers(m) for lin in layer_linears(layer).values()]
    assert len(rep["per_layer"]) == len(linears) == 14
    for lin in linears:
        w = lin.weight
        assert abs(zero_fraction(w) - 0.5) <= 0.005
        if pattern:
            assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
    assert abs(rep["achieved_sparsity"] - 0.5) <= 0.005
    assert rep["params"]["total_after"] == rep["params"]["total_before"]
    assert (rep["calibration"] is None) == (method == "magnitude")
    # norms are untouched, so the blocks' non-zero share falls a bit less than the linears'
    assert 0.49 < rep["params"]["blocks_reduction"] < 0.5
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[1, 5, 9, 11]])).logits).all()


def test_layer_range_prunes_only_those_layers():
    m = tiny_model(3)
    rep = prune_model(m, CharTokenizer(), "wanda", 0.5, calibration=TEXTS, seq_len=32, layers=(1, 2), show_progress=False)
    layers = decoder_layers(m)
    assert zero_fraction(layers[0].mlp.up_proj.weight) == 0 and zero_fraction(layers[2].mlp.up_proj.weight) == 0
    assert abs(zero_fraction(layers[1].mlp.up_proj.weight) - 0.5) < 0.005
    assert all(".1." in k for k in rep["per_layer"])


@pytest.mark.parametrize("importance,reconstruct", [("activation", True), ("taylor", False), ("magnitude", False)])
def test_structured_saves_loadable_smaller_model(tmp_path, importance, reconstruct):
    m = tiny_model()
    ref = copy.deepcopy(m)
    rep = prune_model(m, CharTokenizer(), "structured", 0.25, calibration=TEXTS, seq_len=48, importance=importance,
                      prune_heads=True, reconstruct=reconstruct, show_progress=False)
    assert _untouched(ref, m)
    assert rep["structured"]["importance"] == importance
    assert 0.24 <= rep["params"]["blocks_reduction"] <= 0.26
    assert rep["params"]["blocks_after"] < rep["params"]["blocks_before"]
    out = save_pruned(m, None, tmp_path / "pruned", rep)
    saved = json.loads((out / "pruning_report.json").read_text())
    assert saved["method"] == "structured" and saved["params"] == rep["params"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    cfg = loaded.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 16)  # one whole KV group gone
    assert cfg.intermediate_size == rep["structured"]["channels_keep"] < 128
    n_before = sum(p.numel() for p in ref.model.layers.parameters())
    n_after = sum(p.numel() for p in loaded.model.layers.parameters())
    assert 0.24 <= 1 - n_after / n_before <= 0.26
    x = torch.tensor([[1, 7, 3, 9, 4]])
    with torch.no_grad():
        out_loaded = loaded(x).logits
        assert torch.isfinite(out_loaded).all()
        assert torch.allclose(out_loaded, m(x).logits, atol=1e-5)  # what was saved is what was pruned
    assert torch.equal(loaded.model.embed_tokens.weight, ref.model.embed_tokens.weight)


def test_structured_default_prunes_mlp_channels_only():
    m = tiny_model()
    rep = prune_model(m, CharTokenizer(), "structured", 0.25, calibration=TEXTS, seq_len=48, show_progress=False)
    assert rep["structured"]["importance"] == "activation" and rep["structured"]["kv_groups_keep"] == 2
    assert m.config.intermediate_size == rep["structured"]["channels_keep"] < 128
    assert 0.24 <= rep["params"]["blocks_reduction"] <= 0.26


def test_structured_magnitude_without_refit_needs_no_calibration():
    m = tiny_model()
    rep = prune_model(m, CharTokenizer(), "structured", 0.25, importance="magnitude", reconstruct=False, show_progress=False)
    assert rep["calibration"] is None and rep["structured"]["reconstruct"] is False
    assert 0.24 <= rep["params"]["blocks_reduction"] <= 0.26


def test_save_refuses_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(PaserError):
        save_pruned(tiny_model(), None, tmp_path, {})
    assert (tmp_path / "notes.txt").exists()


def test_bad_arguments_raise_paser_errors():
    m = tiny_model()
    tok = CharTokenizer()
    with pytest.raises(PaserError):
        prune_model(m, tok, "random", 0.5, show_progress=False)
    with pytest.raises(PaserError):
        prune_model(m, tok, "structured", 0.5, "2:4", show_progress=False)
    with pytest.raises(PaserError):
        prune_model(m, tok, "structured", 0.25, layers=(0, 1), show_progress=False)
    with pytest.raises(PaserError):
        prune_model(m, tok, "wanda", 1.5, show_progress=False)
    with pytest.raises(PaserError):
        prune_model(m, tok, "wanda", 0.5, "3:7", calibration=TEXTS, show_progress=False)
    with pytest.raises(PaserError):
        prune_model(m, tok, "wanda", 0.5, importance="taylor", show_progress=False)
    assert zero_fraction(m.model.layers[0].mlp.up_proj.weight) == 0  # nothing was pruned by a refused call


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_wanda_beats_magnitude(monkeypatch, tmp_path_factory):
    import os

    from paser.evaluate.perplexity import corpus_perplexity
    from paser.io.models import load_model

    if not os.environ.get("PASER_CACHE"):
        monkeypatch.setenv("PASER_CACHE", str(tmp_path_factory.mktemp("cache")))
    lm = load_model("smollm2-135m", device="cpu")

    def ppl(model):
        return corpus_perplexity(model, lm.tokenizer, "wikitext2", window=512, max_tokens=2048, show_progress=False).ppl

    dense = ppl(lm.model)
    wanda = copy.deepcopy(lm.model)
    prune_model(wanda, lm.tokenizer, "wanda", 0.5, n_calibration=8, show_progress=False)
    p_wanda = ppl(wanda)
    del wanda
    prune_model(lm.model, lm.tokenizer, "magnitude", 0.5, show_progress=False)
    p_mag = ppl(lm.model)
    assert dense < p_wanda < p_mag


# ----------------------------------------------------------------------------- run_prune end to end


def _tiny_model_dir(path):
    """A tiny LLaMA with a real (word-level) tokenizer saved as a Hugging Face directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the of and to in a is was on for as with by he at from his it an were are which this be".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tiny_model().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_run_prune_loads_prunes_measures_and_saves(tmp_path):
    from paser.prune import run_prune

    src = _tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "out"
    rep = run_prune(str(src), "wanda", 0.5, None, out, calibration=TEXTS, seq_len=32, ppl_tokens=256, ppl_window=128,
                    device="cpu", show_progress=False)
    saved = json.loads((out / "pruning_report.json").read_text())
    assert saved["perplexity"]["before"]["n_tokens"] == saved["perplexity"]["after"]["n_tokens"] == 2 * 127
    assert saved["perplexity"]["after"]["ppl"] != saved["perplexity"]["before"]["ppl"]
    assert saved["calibration"] == {"source": "list of strings", "count": 4, "seq_len": 32, "tokens": rep["calibration"]["tokens"]}
    assert saved["model"]["spec"] == str(src)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert abs(zero_fraction(loaded.model.layers[1].self_attn.q_proj.weight) - 0.5) < 0.005
    assert transformers.AutoTokenizer.from_pretrained(out) is not None
