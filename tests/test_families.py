"""The loop on model families other than LLaMA: tiny random Gemma-3, Qwen2 and Mistral models
(built from a config, no download) go through pruning, scoring, LoRA recovery and evaluation."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from paser.evaluate.perplexity import perplexity
from paser.evaluate.zeroshot import loglikelihoods
from paser.io.models import LoadedModel, fingerprint_model
from paser.prune import decoder_layers, prune_model, save_pruned
from paser.prune.driver import layer_linears
from paser.prune.masks import zero_fraction
from paser.recover.lora import lora_target_modules

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _build(family: str):
    torch.manual_seed(0)
    if family == "gemma3":
        cfg = transformers.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                                            layer_types=["sliding_attention", "full_attention"])
        return transformers.Gemma3ForCausalLM(cfg).eval()
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON)).eval()
    if family == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=None)).eval()
    raise ValueError(family)


FAMILIES = ["gemma3", "qwen2", "mistral"]
TEXTS = ["Give three tips for staying healthy. Eat well, sleep enough and exercise every day."] * 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is faster


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_unstructured_pruning_on_other_families(family, method, tiny_tokenizer):
    m = _build(family)
    rep = prune_model(m, tiny_tokenizer, method, 0.5, calibration=TEXTS, seq_len=32, show_progress=False)
    for layer in decoder_layers(m):
        for lin in layer_linears(layer).values():
            assert abs(zero_fraction(lin.weight) - 0.5) <= 0.01
    assert abs(rep["achieved_sparsity"] - 0.5) <= 0.01
    with torch.no_grad():
        assert torch.isfinite(m(torch.tensor([[1, 5, 9, 11]])).logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_structured_pruning_saves_a_loadable_model(family, tiny_tokenizer, tmp_path):
    m = _build(family)
    rep = prune_model(m, tiny_tokenizer, "structured", 0.25, calibration=TEXTS, seq_len=32, prune_heads=True, show_progress=False)
    out = save_pruned(m, tiny_tokenizer, tmp_path / "pruned", rep)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is type(m)
    assert loaded.config.intermediate_size == rep["structured"]["channels_keep"] < 128
    x = torch.tensor([[1, 7, 3, 9, 4]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, m(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_lora_targets_and_evaluation_on_other_families(family, tiny_tokenizer, tmp_path):
    from paser.io.records import Record
    from paser.score.engine import score_degradation

    orig = _build(family)
    pruned = copy.deepcopy(orig)
    prune_model(pruned, tiny_tokenizer, "magnitude", 0.5, show_progress=False)
    recs = [Record(id=f"r{i}", instruction=f"Add {i} and {i + 1}.", input="", output=f"The sum is {2 * i + 1}.") for i in range(6)]
    lo = LoadedModel(orig, tiny_tokenizer, "", fingerprint_model(orig), "o")
    lp = LoadedModel(pruned, tiny_tokenizer, "", fingerprint_model(pruned), "p")
    res = score_degradation(lo, lp, recs, cache_dir=tmp_path, progress=False)
    assert len(res.ids) == 6 and res.complete and (res.jsd > 0).all() and (res.jsd <= 0.6932).all()

    regex, leaves = lora_target_modules(pruned)
    assert {"q_proj", "v_proj", "down_proj"} <= set(leaves)

    ppl = perplexity(pruned, tiny_tokenizer, " ".join(TEXTS * 8), window=32, max_tokens=128, show_progress=False)
    assert ppl.n_windows == 4 and len(ppl.window_nll) == 4 and ppl.ppl > 1
    lls = loglikelihoods(pruned, tiny_tokenizer, [("Question: 2+2?\nAnswer:", " 4"), ("Question: 2+2?\nAnswer:", " five")],
                         show_progress=False)
    direct = loglikelihoods(pruned, tiny_tokenizer, [("Question: 2+2?\nAnswer:", " 4"), ("Question: 2+2?\nAnswer:", " five")],
                            share_prefix=False, show_progress=False)
    assert lls == pytest.approx(direct, abs=1e-4)  # the KV-cache path works for this family's cache


def test_structured_shapes_name_a_layout_they_cannot_cut():
    """The adapter knows which projections structured pruning cuts; a layer without them (here
    a Qwen2 whose MLP projection was renamed) is one clear ModelError, not an AttributeError."""
    from paser.errors import ModelError
    from paser.io.adapter import structured_shapes

    model = _build("qwen2")
    assert structured_shapes(model)[-1] == COMMON["intermediate_size"]
    mlp = decoder_layers(model)[1].mlp
    mlp.fc_in = mlp.gate_proj
    del mlp.gate_proj
    with pytest.raises(ModelError, match="LLaMA-style layers.*layer 1"):
        structured_shapes(model)
