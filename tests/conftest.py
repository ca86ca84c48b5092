"""Shared fixtures: a tiny random-initialised LLaMA with a real (tiny, trained-here) tokenizer.

Everything is built offline in a second, so unit tests never touch the real models.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "Give three tips for staying healthy. Eat well, sleep enough and exercise every day.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } : ; , . ! ?",
]


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on a few sentences (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return fast


def tiny_llama(vocab_size: int = 128, seed: int = 0, **overrides):
    """A random-initialised 2-layer LLaMA; `overrides` change any LlamaConfig field."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def magnitude_prune_(model, share: float = 0.5):
    """Zero the smallest-magnitude `share` of every decoder-layer Linear weight, in place (a
    stand-in pruned model that needs no calibration); returns the model."""
    import torch

    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                w = mod.weight
                thr = w.abs().flatten().kthvalue(int(w.numel() * share)).values
                w[w.abs() <= thr] = 0.0
    return model


def save_dense_and_sparse(root, tok, head_scale: float | None = None):
    """Save a tiny LLaMA (untied head, optionally scaled for peaked distributions) and its
    50 %-magnitude-pruned copy, each with `tok`; returns (dense dir, sparse dir)."""
    import torch

    dense = tiny_llama(len(tok), tie_word_embeddings=False)
    if head_scale is not None:
        with torch.no_grad():
            dense.lm_head.weight.mul_(head_scale)
    dense.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    magnitude_prune_(dense)
    dense.save_pretrained(root / "sparse")
    tok.save_pretrained(root / "sparse")
    return root / "dense", root / "sparse"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is faster, and far faster on a busy shared CPU (measured 40x)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny LLaMA directory that `paser.io.models.load_model` and from_pretrained load."""
    d = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_llama(len(tiny_tokenizer))
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_pruned_dir(tmp_path_factory, tiny_tokenizer):
    """A second tiny LLaMA with the same tokenizer and different weights (a stand-in 'pruned' model)."""
    d = tmp_path_factory.mktemp("tiny_llama_pruned")
    model = magnitude_prune_(tiny_llama(len(tiny_tokenizer), seed=1))
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def write_pipeline_config(path, original, pruned, out, methods, recover="{max_steps: 2, batch_size: 2}", extra=""):
    """A `paser pipeline` config on the tiny models: small pool, one budget and seed, a few
    training steps and a small evaluation, so a whole pipeline runs in seconds."""
    import json

    path.write_text(
        f"""out: {out}
original: {original}
pruned: {pruned}
pool_limit: 40
budgets: ["6"]
methods: {json.dumps(methods)}
seeds: [0]
cache_dir: {out}/cache
select: {{k_min: 2, k_max: 4, plots: false}}
recover: {recover}
evaluate: {{tasks: "wikitext2,heldout,piqa", limit: 4, ppl_tokens: 256, ppl_window: 64}}
{extra}"""
    )
    return path
