"""Recovery outputs and robustness: a portable adapter, --save-dtype, --report-to, the progress
bar's label, and checkpoints that cannot strand a run. Tiny random LLaMAs, seconds each."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from conftest import magnitude_prune_, tiny_llama
from test_recover import _StepCounter, _adapter_tensors, _Crash, _crash_at, _records, _tokenizer

from paser.errors import PaserError
from paser.recover import recover
from paser.recover.lora import _last_checkpoint, _report_integration, offline_logging, resolve_save_dtype

pytestmark = pytest.mark.usefixtures("one_thread")
KW = dict(lr=5e-3, batch_size=4, seed=3, show_progress=False)


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("outputs") / "sparse"
    m = magnitude_prune_(tiny_llama(len(tok), tie_word_embeddings=False))
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d


# ----------------------------------------------------------------------------- portable adapter


def test_adapter_loads_from_another_working_directory(tmp_path, sparse_dir, monkeypatch):
    import shutil

    from peft import AutoPeftModelForCausalLM

    from paser.evaluate.runner import load_for_evaluation

    work = tmp_path / "work"
    shutil.copytree(sparse_dir, work / "runs" / "pruned")
    monkeypatch.chdir(work)
    recover("runs/pruned", _records(6), "runs/rec", max_steps=1, **KW)  # a relative model path, as users type it
    cfg = json.loads((work / "runs" / "rec" / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str((work / "runs" / "pruned").resolve())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    adapter = str(work / "runs" / "rec" / "adapter")
    ids = torch.tensor([[1, 5, 9, 12]])
    plain = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()  # plain peft: base found through the config
    em = load_for_evaluation(adapter)  # paser: the adapter directory alone
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, em.model(input_ids=ids).logits)


# ----------------------------------------------------------------------------- --save-dtype


def test_resolve_save_dtype():
    assert resolve_save_dtype("auto", "bfloat16", torch.float32) == torch.bfloat16
    assert resolve_save_dtype("auto", None, torch.float32) == torch.float32  # no dtype in config: as trained
    assert resolve_save_dtype("float32", "bfloat16", torch.float32) == torch.float32
    with pytest.raises(PaserError, match="save_dtype must be one of"):
        resolve_save_dtype("int8", None, torch.float32)


def _merged_dtypes(merged_dir) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(merged_dir / "model.safetensors"), framework="pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def test_save_dtype_follows_the_models_config_and_keeps_zeros(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    bf = magnitude_prune_(tiny_llama(len(tok), tie_word_embeddings=False)).to(torch.bfloat16)
    bf.save_pretrained(tmp_path / "bf16")
    tok.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"

    rep = recover(str(tmp_path / "bf16"), _records(6), tmp_path / "auto", max_steps=2, **KW)
    assert rep["dtype"] == "float32" and rep["save_dtype"] == "bfloat16"  # trained in float32 on the CPU
    assert _merged_dtypes(tmp_path / "auto" / "merged") == {"BF16"}
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "auto" / "merged")
    assert m.dtype == torch.bfloat16
    src = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    w, w0 = m.model.layers[0].mlp.down_proj.weight, src.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w == 0, w0 == 0)  # the pruned zeros survive the cast
    assert rep["sparsity"]["after_merge"] == pytest.approx(rep["sparsity"]["before"])

    rep32 = recover(str(tmp_path / "bf16"), _records(6), tmp_path / "f32", max_steps=2, save_dtype="float32", **KW)
    assert rep32["save_dtype"] == "float32" and _merged_dtypes(tmp_path / "f32" / "merged") == {"F32"}


# ----------------------------------------------------------------------------- --report-to and the bar


def test_report_to_names_the_missing_package_and_keeps_wandb_offline(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("tensorboard", "tensorboardX", "wandb") else real(n, *a))
    with pytest.raises(PaserError, match="pip install tensorboard"):
        _report_integration("tensorboard")
    with pytest.raises(PaserError, match="pip install wandb"):
        _report_integration("wandb")
    with pytest.raises(PaserError, match="report_to must be one of"):
        _report_integration("mlflow")
    assert _report_integration("none") == "none"

    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "wandb" else real(n, *a))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert _report_integration("wandb") == "wandb" and "WANDB_MODE" not in os.environ  # nothing set for the process
    with offline_logging("wandb"):
        assert os.environ["WANDB_MODE"] == "offline"  # while the run trains
    assert "WANDB_MODE" not in os.environ  # and not after it
    with offline_logging("tensorboard"):
        assert "WANDB_MODE" not in os.environ
    monkeypatch.setenv("WANDB_MODE", "online")  # the user's own choice is kept
    with offline_logging("wandb"):
        assert os.environ["WANDB_MODE"] == "online"
    assert os.environ["WANDB_MODE"] == "online"


def test_cli_report_to_missing_package_is_one_line(tmp_path, sparse_dir, capsys, monkeypatch):
    import importlib.util

    from paser.cli import main
    from paser.io.records import write_jsonl

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("tensorboard", "tensorboardX") else real(n, *a))
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [r.to_dict() for r in _records(3)])
    rc = main(["recover", "--model", str(sparse_dir), "--data", str(data), "--out", str(tmp_path / "o"), "--report-to", "tensorboard"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install tensorboard" in err and "Traceback" not in err


def test_progress_bar_is_labelled(tmp_path, sparse_dir, capfd):
    recover(str(sparse_dir), _records(4), tmp_path, max_steps=1, **{**KW, "show_progress": True})
    assert "LoRA recovery" in capfd.readouterr().err


# ----------------------------------------------------------------------------- checkpoints


def test_incomplete_checkpoints_are_skipped(tmp_path, sparse_dir, caplog):
    recs = _records(12)
    kw = dict(epochs=2, save_steps=2, **KW)  # 6 steps, checkpoints at 2 and 4 (the Trainer keeps 2)
    straight = recover(str(sparse_dir), recs, tmp_path / "a", **kw)
    with pytest.raises(_Crash):
        recover(str(sparse_dir), recs, tmp_path / "b", callbacks=[_crash_at(5)], **kw)
    ckpts = tmp_path / "b" / "checkpoints"
    assert _last_checkpoint(ckpts).endswith("checkpoint-4")
    # A kill during the save of step 4 (no trainer_state.json yet), and a later one with garbage.
    (ckpts / "checkpoint-4" / "trainer_state.json").unlink()
    (ckpts / "checkpoint-6").mkdir()
    (ckpts / "checkpoint-6" / "trainer_state.json").write_text("{not json")
    counter = _StepCounter()
    with caplog.at_level(logging.WARNING):
        resumed = recover(str(sparse_dir), recs, tmp_path / "b", callbacks=[counter], **kw)
    assert "incomplete checkpoint" in caplog.text and "checkpoint-4" in caplog.text and "checkpoint-6" in caplog.text
    assert counter.steps == [3, 4, 5, 6] and resumed["training"]["resumed_from_step"] == 2
    a, b = _adapter_tensors(tmp_path / "a"), _adapter_tensors(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert straight["training"]["steps"] == resumed["training"]["steps"] == 6

    # No complete checkpoint at all: the run starts over (and still ends where it should).
    with pytest.raises(_Crash):
        recover(str(sparse_dir), recs, tmp_path / "c", callbacks=[_crash_at(3)], **kw)
    (tmp_path / "c" / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 7}')
    counter = _StepCounter()
    fresh = recover(str(sparse_dir), recs, tmp_path / "c", callbacks=[counter], **kw)
    assert counter.steps == [1, 2, 3, 4, 5, 6] and fresh["training"]["resumed_from_step"] is None
    c = _adapter_tensors(tmp_path / "c")
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=1e-5, atol=1e-6, msg=k)
