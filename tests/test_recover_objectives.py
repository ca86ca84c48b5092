"""The recovery-objective registry: the built-in entries, and a toy objective registered here
that runs through `paser recover` (CLI, config validation, run key, report). Tiny random
LLaMA, seconds."""

from __future__ import annotations

import json

import pytest

from conftest import magnitude_prune_, tiny_llama, write_pipeline_config
from test_recover import _records, _tokenizer

from paser.cli import main
from paser.config import RecoverArgs, build_args
from paser.errors import PaserError
from paser.io.records import write_jsonl
from paser.recover.data import ResponseCollator
from paser.recover.objectives import (
    RECOVERY_OBJECTIVES,
    TrainerPiece,
    get_objective,
    option_help,
    recovery_objectives,
    register_objective,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory):
    tok = _tokenizer()
    d = tmp_path_factory.mktemp("objectives") / "sparse"
    m = magnitude_prune_(tiny_llama(len(tok), tie_word_embeddings=False))
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_builtin_objectives_declare_their_teacher_and_options():
    table = recovery_objectives()
    assert list(table)[:3] == ["sft", "kd", "sft+kd"]
    assert not table["sft"].needs_teacher and not table["sft"].options
    assert table["kd"].needs_teacher and table["sft+kd"].needs_teacher
    assert "kd_weight" in table["sft+kd"].options and "kd_weight" not in table["kd"].options
    assert {"kd_temperature", "kd_topk", "teacher"} <= set(table["kd"].options)
    assert option_help("kd_topk").startswith("kd, sft+kd: ")
    with pytest.raises(PaserError, match="objective must be one of sft, kd, sft\\+kd"):
        get_objective("distil")


def _scaled_sft(ctx):
    """SFT whose loss is kd_weight × the response cross-entropy (a toy)."""
    from transformers import Trainer

    weight = ctx.options.kd_weight

    class ScaledTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            return (weight * loss, outputs) if return_outputs else weight * loss

    return TrainerPiece(ScaledTrainer, ResponseCollator(ctx.pad_id, ctx.pad_to_multiple_of), ctx.train_ds)


def test_a_registered_toy_objective_runs_through_cli_config_pipeline_and_report(tmp_path, sparse_dir, tiny_model_dir, tiny_pruned_dir):
    register_objective("sft_scaled", "kd_weight x the response cross-entropy (a toy)",
                       options={"kd_weight": "the loss weight (a toy)"})(_scaled_sft)  # fmt: skip
    try:
        data = tmp_path / "sel.jsonl"
        write_jsonl(data, [r.to_dict() for r in _records(6)])
        base = ["recover", "--model", str(sparse_dir), "--data", str(data), "--max-steps", "2", "--batch-size", "3",
                "--lr", "5e-3", "--seed", "3"]  # fmt: skip
        assert main([*base, "--out", str(tmp_path / "sft")]) == 0
        assert main([*base, "--out", str(tmp_path / "toy"), "--objective", "sft_scaled", "--kd-weight", "0.5"]) == 0
        sft = json.loads((tmp_path / "sft" / "recovery_report.json").read_text())
        toy = json.loads((tmp_path / "toy" / "recovery_report.json").read_text())
        assert toy["objective"] == "sft_scaled" and toy["kd"] is None
        assert toy["config"]["objective"] == "sft_scaled" and toy["config"]["options"] == {"kd_weight": 0.5}
        assert "objective" not in sft["config"]  # the default objective keeps its old run key
        assert toy["run_key"] != sft["run_key"]
        # step 1 starts from the same weights (LoRA B = 0): the toy's loss is half the CE
        la = json.loads((tmp_path / "sft" / "training_log.json").read_text())["train"][0]["loss"]
        lb = json.loads((tmp_path / "toy" / "training_log.json").read_text())["train"][0]["loss"]
        assert lb == pytest.approx(0.5 * la, rel=1e-5)
        assert (tmp_path / "toy" / "merged" / "config.json").exists()
        # a pipeline `recover:` section accepts it; an unregistered name is still refused
        assert build_args(RecoverArgs, {"objective": "sft_scaled"}).objective == "sft_scaled"
        with pytest.raises(PaserError, match="sft_scaled"):  # the error lists the registered choices
            build_args(RecoverArgs, {"objective": "sft_half"})
        # the pipeline trains with it, and gives it no teacher (it needs none)
        cfg = write_pipeline_config(tmp_path / "exp.yaml", tiny_model_dir, tiny_pruned_dir, tmp_path / "run", ["random"],
                                    recover="{max_steps: 2, batch_size: 2, objective: sft_scaled}",
                                    extra="include_dense: false\ninclude_unrecovered: false\n")  # fmt: skip
        assert main(["pipeline", "--config", str(cfg)]) == 0
        (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "run" / "recover").glob("*/recovery_report.json")]
        assert rec["objective"] == "sft_scaled" and rec["config"]["options"] == {"kd_weight": 0.5}
        (done,) = [json.loads(p.read_text()) for p in (tmp_path / "run" / "recover").glob("*/DONE.json")]
        assert done["key"]["objective"] == "sft_scaled" and "teacher" not in done["key"]
    finally:
        RECOVERY_OBJECTIVES.pop("sft_scaled", None)


def test_the_cli_options_and_recover_share_their_defaults_and_choices():
    """RecoverArgs (CLI, YAML, API) and RecoverOptions (recover()'s keywords) name the same
    settings twice, so that config.py need not import the trainer; they must agree."""
    import dataclasses

    from paser.config import RecoverArgs, field_choices
    from paser.recover import lora

    opts = {f.name: f for f in dataclasses.fields(lora.RecoverOptions)}
    shared = [f for f in dataclasses.fields(RecoverArgs) if f.name in opts]
    assert len(shared) >= 24
    for f in shared:
        assert f.default == opts[f.name].default, f.name
    by_name = {f.name: f for f in shared}
    assert set(field_choices(by_name["save_dtype"])) == set(lora.SAVE_DTYPES)
    assert set(field_choices(by_name["report_to"])) == set(lora.REPORT_TO)
