"""Configuration: YAML + command-line overrides, and clear errors for a user's mistakes."""

from __future__ import annotations

import pytest

from paser.cli import build_parser, main, _args_for
from paser.config import SelectArgs, build_args, load_yaml
from paser.errors import InputError


def test_yaml_then_cli_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pruned: out/p\nbudget: 0.2\nseed: 3\ndata: [a.json, b.json]\n")
    ns = build_parser().parse_args(["select", "--config", str(cfg), "--seed", "7", "--out", "o"])
    a = _args_for(SelectArgs, ns)
    assert (a.pruned, a.budget, a.seed, a.out, a.data) == ("out/p", "0.2", 7, "o", ["a.json", "b.json"])


def test_unknown_yaml_key_names_file_and_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pruned: x\nbugdet: 5\n")
    with pytest.raises(InputError) as ei:
        build_args(SelectArgs, load_yaml(cfg), source=cfg)
    assert ei.value.line == 2 and ei.value.field == "bugdet"


def test_bad_type_and_bad_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: many\n")
    with pytest.raises(InputError, match="expected an integer"):
        build_args(SelectArgs, load_yaml(cfg), source=cfg)
    cfg.write_text("seed: [1\n")
    with pytest.raises(InputError, match="invalid YAML"):
        load_yaml(cfg)


def test_cli_reports_user_error_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a"}\n')
    rc = main(["recover", "--model", "m", "--data", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.jsonl, line 1, field 'output'" in err and "Traceback" not in err


def test_evaluate_command_end_to_end(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "r.json"
    rc = main(["evaluate", "--model", str(tiny_model_dir), "--tasks", "wikitext2,heldout,arc_easy", "--limit", "3",
               "--ppl-tokens", "256", "--ppl-window", "64", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and out.exists()
    assert "wikitext2" in printed and "perplexity" in printed and "arc_easy" in printed and "acc" in printed


def test_prune_and_recover_commands_end_to_end(tmp_path, tiny_model_dir, capsys):
    import json

    from paser.data import pool_path
    from paser.io.records import load_records, write_jsonl

    pruned = tmp_path / "p"
    assert main(["prune", "--model", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--n-calibration", "4",
                 "--ppl-tokens", "0", "--out", str(pruned)]) == 0
    assert "achieved sparsity: 0.5" in capsys.readouterr().out
    assert json.loads((pruned / "pruning_report.json").read_text())["method"] == "wanda"
    write_jsonl(tmp_path / "sel.jsonl", [r.to_dict() for r in load_records(pool_path())[0][:6]])
    assert main(["recover", "--model", str(pruned), "--data", str(tmp_path / "sel.jsonl"), "--out", str(tmp_path / "rec"),
                 "--max-steps", "2", "--batch-size", "2"]) == 0
    assert "training loss" in capsys.readouterr().out
    assert (tmp_path / "rec" / "merged" / "config.json").exists()


def test_estimate_command(tmp_path, tiny_model_dir, tiny_pruned_dir, capsys):
    rc = main(["estimate", "--original", str(tiny_model_dir), "--pruned", str(tiny_pruned_dir), "--limit", "40", "--budget", "4",
               "--cache-dir", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert rc == 0 and "on 40 records (budget 4)" in out and "forward passes: 80 sequences" in out and "peak memory" in out


def test_an_estimate_names_a_token_budget_as_tokens():
    from paser.select.estimate import Estimate

    base = dict(method="paser", pool_size=10, sample_size=3, tokens_per_record=1.0, tokens=1, padded_tokens=1, forward_sequences=1)
    assert "(budget 16,000 tokens)" in Estimate(budget=16000, budget_unit="tokens", **base).summary()
    assert "(budget 4)" in Estimate(budget=4, **base).summary()
