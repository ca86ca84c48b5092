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
    with pytest.raises(InputError, match="expected int"):
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
