"""Recovery (LoRA through peft): response-only loss, mask-preserving merge, resume, outputs.

All on a tiny random LLaMA with a tiny byte-level BPE tokenizer built here (no downloads).
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import magnitude_prune_, save_dense_and_sparse, tiny_llama

from paser.errors import PaserError
from paser.io.records import Record
from paser.recover import (
    apply_zero_mask,
    encode_records,
    linear_sparsity,
    lora_target_modules,
    pad_batch,
    recover,
    sparsity_masks,
)
from paser.recover.lora import _last_checkpoint

WORDS = "the cat sat on a mat dog ran to park sun is hot sky blue add two and three five sum of numbers".split()


def _records(n: int, seed: int = 0) -> list[Record]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        idx = torch.randint(len(WORDS), (12,), generator=g).tolist()
        words = [WORDS[j] for j in idx]
        out.append(
            Record(
                instruction=" ".join(words[:4]),
                input=" ".join(words[4:6]) if i % 2 else "",
                output=" ".join(words[6:]) + f" {i}",
            )
        )
    return out


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [" ".join(WORDS)] * 4 + ["Below is an instruction that describes a task. ### Instruction: ### Response:"]
    tk.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is faster


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tok):
    """(dense dir, 50 %-sparse dir) of the same tiny LLaMA, each with the tokenizer."""
    return save_dense_and_sparse(tmp_path_factory.mktemp("models"), tok)


def _adapter_tensors(out_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out_dir / "adapter" / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------- data and loss


def test_labels_mask_exactly_the_prompt(tok):
    from paser.io.templates import encode_example

    recs = _records(6)
    ds = encode_records(recs, tok, "alpaca", cutoff=256)
    for rec, ex in zip(recs, ds.examples):
        enc = encode_example(rec, tok, "alpaca", 256)
        assert ex["input_ids"] == enc.input_ids
        n = enc.n_prompt
        assert n > 0 and enc.n_response > 0
        assert ex["labels"][:n] == [-100] * n
        assert ex["labels"][n:] == ex["input_ids"][n:]
    batch = pad_batch(ds.examples[:3], pad_token_id=tok.pad_token_id)
    lengths = [len(e["input_ids"]) for e in ds.examples[:3]]
    assert batch["input_ids"].shape == (3, max(lengths))  # dynamic: the longest, not the cutoff
    for i, k in enumerate(lengths):
        assert batch["attention_mask"][i].sum() == k
        assert (batch["labels"][i, k:] == -100).all()
        assert (batch["input_ids"][i, k:] == tok.pad_token_id).all()
    assert ds.n_response_tokens == sum((b != -100).sum().item() for b in [torch.tensor(e["labels"]) for e in ds.examples])


def test_loss_is_mean_over_response_tokens_only(tok):
    model = tiny_llama(len(tok), tie_word_embeddings=False)
    ds = encode_records(_records(4), tok, "alpaca", cutoff=256)
    batch = pad_batch(ds.examples, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
        logp = torch.log_softmax(out.logits.double(), dim=-1)
    # Position t-1 predicts token t; by hand, over every real (non-padding) position.
    nll, n, all_nll, all_n = 0.0, 0, 0.0, 0
    for i, ex in enumerate(ds.examples):
        ids = torch.tensor(ex["input_ids"])
        n_prompt = sum(1 for t in ex["labels"] if t == -100)
        tok_nll = -logp[i, : len(ids) - 1].gather(-1, ids[1:, None]).squeeze(-1)  # predicts ids[1:]
        resp = tok_nll[n_prompt - 1 :]  # predictions of tokens n_prompt .. end
        nll, n = nll + resp.sum().item(), n + resp.numel()
        all_nll, all_n = all_nll + tok_nll.sum().item(), all_n + tok_nll.numel()
    assert n == ds.n_response_tokens
    assert out.loss.item() == pytest.approx(nll / n, rel=1e-5)
    assert abs(out.loss.item() - all_nll / all_n) > 1e-4  # the prompt really is left out


def test_apply_zero_mask_is_pure():
    w = torch.arange(1.0, 7.0).view(2, 3)
    mask = torch.tensor([[True, False, False], [False, True, True]])
    got = apply_zero_mask(w, mask)
    assert torch.equal(got, torch.tensor([[0.0, 2.0, 3.0], [4.0, 0.0, 0.0]]))
    assert w[0, 0] == 1.0  # input untouched
    with pytest.raises(ValueError):
        apply_zero_mask(w, mask.T)


def test_lora_targets_every_decoder_projection():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    names = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    regex, leaves = lora_target_modules(tiny_llama(64, tie_word_embeddings=False))
    assert leaves == names
    gemma = Gemma3ForCausalLM(
        Gemma3TextConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, layer_types=["sliding_attention", "full_attention"],
        )
    )  # fmt: skip
    regex_g, leaves_g = lora_target_modules(gemma)
    assert leaves_g == names
    import re

    assert re.fullmatch(regex_g, "model.layers.1.mlp.down_proj")
    assert not re.fullmatch(regex_g, "lm_head")


# ----------------------------------------------------------------------------- the stage


def test_sparse_merge_keeps_zero_mask_and_loads(tmp_path, model_dirs):
    from transformers import AutoModelForCausalLM

    _, sparse_dir = model_dirs
    sparse = AutoModelForCausalLM.from_pretrained(sparse_dir)
    masks = sparsity_masks(sparse)
    assert len(masks) == 14  # 7 projections x 2 layers
    before = linear_sparsity(sparse)["sparsity"]
    assert before == pytest.approx(0.5, abs=0.01)

    rep = recover(str(sparse_dir), _records(8), tmp_path, lr=5e-3, max_steps=4, batch_size=4, show_progress=False)
    lora_b = [t for k, t in _adapter_tensors(tmp_path).items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # the update is real...
    assert rep["sparsity"]["entries_reset_to_zero"] > 0  # ...and a plain merge would have filled zeros in

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    mods = dict(merged.named_modules())
    changed = 0
    for name, mask in masks.items():
        w = mods[name].weight
        assert torch.equal(w == 0, mask), name  # zeros exactly where they were
        changed += (w != dict(sparse.named_modules())[name].weight).sum().item()
    assert changed > 0  # the surviving weights did move
    assert rep["sparsity"]["before"] == pytest.approx(before)
    assert rep["sparsity"]["after_merge"] == pytest.approx(before)

    tok2 = __import__("transformers").AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = tok2("the cat sat", return_tensors="pt")["input_ids"]
    assert torch.isfinite(merged(input_ids=ids).logits).all()
    for f in ("training_log.json", "recovery_report.json"):
        assert (tmp_path / f).exists()
    assert not (tmp_path / "checkpoints").exists()


def test_dense_merge_is_plain(tmp_path, model_dirs):
    dense_dir, _ = model_dirs
    rep = recover(
        str(dense_dir), _records(6), tmp_path, lr=5e-3, max_steps=2, batch_size=2, group_by_length=True,
        show_progress=False,
    )  # fmt: skip
    assert rep["training"]["steps"] == 2
    assert rep["sparsity"]["masked_modules"] == 0
    assert rep["sparsity"]["before"] == rep["sparsity"]["after_merge"] == 0.0


class _Crash(Exception):
    pass


def _crash_at(step: int):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == step:
                raise _Crash(f"killed at step {step}")

    return Crash()


class _StepCounter(__import__("transformers").TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kw):
        self.steps.append(state.global_step)


def test_resume_gives_the_same_adapter(tmp_path, model_dirs):
    _, sparse_dir = model_dirs
    recs = _records(12)
    kw = dict(lr=5e-3, epochs=2, batch_size=4, save_steps=2, seed=3, show_progress=False)  # 6 steps, dropout on

    straight = recover(str(sparse_dir), recs, tmp_path / "a", **kw)
    assert straight["training"]["steps"] == 6

    with pytest.raises(_Crash):
        recover(str(sparse_dir), recs, tmp_path / "b", callbacks=[_crash_at(3)], **kw)  # checkpoint-2 exists
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-2").is_dir()
    before = json.loads((tmp_path / "b" / "checkpoints" / "checkpoint-2" / "paser_elapsed.json").read_text())["seconds"]
    assert before > 0
    with pytest.raises(PaserError, match="different run"):
        recover(str(sparse_dir), recs, tmp_path / "b", **{**kw, "lr": 1e-3})
    counter = _StepCounter()
    resumed = recover(str(sparse_dir), recs, tmp_path / "b", callbacks=[counter], **kw)
    assert counter.steps == [3, 4, 5, 6]  # it continued from checkpoint-2; it did not start over
    assert resumed["training"]["resumed_from_step"] == 2
    assert resumed["training"]["steps"] == 6
    # the cost of recovery counts the part before the crash too
    assert resumed["seconds_total"] == pytest.approx(before + resumed["seconds"])

    a, b = _adapter_tensors(tmp_path / "a"), _adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    la = json.loads((tmp_path / "a" / "training_log.json").read_text())["train"]
    lb = json.loads((tmp_path / "b" / "training_log.json").read_text())["train"]
    assert [e["step"] for e in lb] == list(range(1, 7))
    assert [e["loss"] for e in la] == pytest.approx([e["loss"] for e in lb], rel=1e-5)

    # A finished run is not redone: the stored report comes back and training never starts.
    again = recover(str(sparse_dir), recs, tmp_path / "b", callbacks=[_crash_at(0)], **kw)
    assert again == json.loads((tmp_path / "b" / "recovery_report.json").read_text())

    # Time-based checkpoints: with save_steps beyond the run, the clock alone decides (here after
    # every step), and a run killed at step 5 resumes from checkpoint-5 to the same adapter.
    kw_t = {**kw, "save_steps": 100, "save_minutes": 1e-9}
    with pytest.raises(_Crash):
        recover(str(sparse_dir), recs, tmp_path / "c", callbacks=[_crash_at(5)], **kw_t)
    assert _last_checkpoint(tmp_path / "c" / "checkpoints").endswith("checkpoint-5")
    counter = _StepCounter()
    recover(str(sparse_dir), recs, tmp_path / "c", callbacks=[counter], **kw_t)
    assert counter.steps == [6]
    c = _adapter_tensors(tmp_path / "c")
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-5, atol=1e-6, msg=k)


def test_training_loss_falls_and_validation_is_logged(tmp_path, tok):
    # A random tiny LM head (std 0.02) caps every logit near 0, so no adapter could fit the data;
    # a 15x larger head leaves the LoRA layers room to learn.
    model = tiny_llama(len(tok), tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(15)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    rep = recover(
        str(tmp_path / "m"), _records(10), out, lr=1e-2, epochs=6, batch_size=3, val_fraction=0.2, show_progress=False
    )
    assert rep["data"]["train_examples"] == 8 and rep["data"]["val_examples"] == 2
    log = json.loads((out / "training_log.json").read_text())
    losses = [e["loss"] for e in log["train"]]
    assert len(losses) == rep["training"]["steps"] == 18  # ceil(8 / 3) steps x 6 epochs, one entry per step
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3
    assert log["val"][0]["step"] == 0 and log["val"][-1]["step"] == 18
    assert log["val"][-1]["loss"] < log["val"][0]["loss"]
    assert rep["loss"]["initial_val"] == log["val"][0]["loss"]
    assert rep["loss"]["initial_train"] == losses[0] and rep["loss"]["final_train"] == losses[-1]
    assert rep["initial_loss"] == losses[0] and rep["final_loss"] == losses[-1]  # the flat keys the API reads
    assert rep["tokens_trained"] == 6 * rep["data"]["response_tokens_per_epoch"]
    assert rep["training"]["tokens_seen"] == 6 * rep["data"]["tokens_per_epoch"]


def test_user_errors(tmp_path, model_dirs):
    dense_dir, _ = model_dirs
    with pytest.raises(PaserError):
        recover(str(dense_dir), [], tmp_path)
    with pytest.raises(PaserError):
        recover(str(dense_dir), _records(3), tmp_path, val_fraction=0.9999)
    with pytest.raises(PaserError, match="save_minutes must be >= 0"):
        recover(str(dense_dir), _records(3), tmp_path, save_minutes=-1)


@pytest.mark.slow
def test_real_smollm2_sparse_recovery_keeps_sparsity(tmp_path, one_thread):
    """The embedded SmolLM2 (from GGUF), 50 % magnitude-sparse, 2 LoRA steps: zeros survive the merge."""
    from paser.data import pool_path
    from paser.io.models import load_model
    from paser.io.records import load_records

    lm = load_model("smollm2-135m")
    magnitude_prune_(lm.model)
    lm.model.save_pretrained(tmp_path / "sparse")
    lm.tokenizer.save_pretrained(tmp_path / "sparse")
    before = sparsity_masks(lm.model)
    del lm
    pool, _ = load_records(pool_path())
    rep = recover(
        str(tmp_path / "sparse"), pool[:4], tmp_path / "out", cutoff=96, max_steps=2, batch_size=2, show_progress=False
    )
    assert rep["sparsity"]["masked_modules"] == len(before) == 30 * 7
    assert rep["sparsity"]["after_merge"] == pytest.approx(rep["sparsity"]["before"])
    assert rep["sparsity"]["entries_reset_to_zero"] > 0
    assert all(e["loss"] == e["loss"] for e in json.loads((tmp_path / "out" / "training_log.json").read_text())["train"])
    merged = load_model(str(tmp_path / "out" / "merged")).model
    mods = dict(merged.named_modules())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
        assert torch.equal(mods[name].weight == 0, before[name])
