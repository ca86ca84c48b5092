"""Model loading: local directories, pickles only on request, fingerprints, tokenizer checks."""

from __future__ import annotations

import pytest
import torch

from paser.errors import ModelError
from paser.io.models import check_same_tokenizer, fingerprint_model, load_model


def test_load_local_dir_and_fingerprint(tiny_model_dir, tiny_pruned_dir):
    a = load_model(str(tiny_model_dir), device="cpu")
    assert a.model.dtype == torch.float32 and a.tokenizer.pad_token_id is not None
    again = load_model(str(tiny_model_dir), device="cpu")
    assert a.fingerprint == again.fingerprint
    b = load_model(str(tiny_pruned_dir), device="cpu")
    assert a.fingerprint != b.fingerprint
    check_same_tokenizer(a.tokenizer, b.tokenizer)


def test_in_memory_fingerprint_sees_weight_changes(tiny_model_dir):
    m = load_model(str(tiny_model_dir), device="cpu").model
    f0 = fingerprint_model(m)
    with torch.no_grad():
        next(m.parameters()).view(-1)[0] += 1.0
    assert fingerprint_model(m) != f0


def test_pickle_needs_explicit_permission(tmp_path, tiny_model_dir):
    lm = load_model(str(tiny_model_dir), device="cpu")
    ckpt = tmp_path / "pruned_model.bin"
    torch.save({"model": lm.model, "tokenizer": lm.tokenizer}, ckpt)
    with pytest.raises(ModelError, match="--allow-pickle"):
        load_model(str(ckpt))
    loaded = load_model(str(ckpt), allow_pickle=True, device="cpu")
    assert loaded.fingerprint == fingerprint_model(lm.model)


def test_tokenizer_mismatch_is_a_clear_error(tiny_model_dir):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tokenizer

    a = load_model(str(tiny_model_dir), device="cpu").tokenizer
    other = make_tokenizer(vocab_size=300)
    with pytest.raises(ModelError, match="do not share a tokenizer"):
        check_same_tokenizer(a, other)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="neither an embedded name"):
        load_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


@pytest.mark.slow
def test_embedded_smollm2_loads():
    lm = load_model("smollm2-135m", device="cpu")
    assert lm.model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in lm.model.parameters()) == 134_515_008
    assert not getattr(lm.model.config, "quantization_config", None)
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = lm.model(**ids).logits[0, -1]
    assert torch.isfinite(out).all()


def test_special_tokens_follow_the_given_ids(tiny_model_dir):
    """A converted tokenizer whose eos disagrees with the GGUF file's is corrected, in the
    tokenizer and in both configs; ids that already agree change nothing."""
    from paser.io.models import set_special_tokens

    lm = load_model(str(tiny_model_dir), device="cpu")
    tok, model = lm.tokenizer, lm.model
    want = 5 if tok.eos_token_id != 5 else 6
    changed = set_special_tokens(tok, model, {"eos": want, "pad": want})
    assert tok.eos_token_id == want and tok.pad_token_id == want
    assert model.config.eos_token_id == want and model.generation_config.eos_token_id == want
    assert changed and changed[0].startswith("eos: ")
    assert set_special_tokens(tok, model, {"eos": want}) == []


@pytest.mark.slow
def test_embedded_special_tokens_are_the_gguf_files():
    """The embedded SmolLM2 ends answers with <|im_end|> (id 2) and pads with it, as its GGUF
    file declares, whichever transformers version converted it."""
    from paser.io.models import EMBEDDED, _embedded_gguf_path, gguf_special_tokens

    ids = gguf_special_tokens(_embedded_gguf_path(EMBEDDED["smollm2-135m"]))
    assert ids == {"bos": 1, "eos": 2, "pad": 2}
    lm = load_model("smollm2-135m", device="cpu")
    assert (lm.tokenizer.eos_token, lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id) == ("<|im_end|>", 2, 2)
    assert lm.model.config.eos_token_id == 2
