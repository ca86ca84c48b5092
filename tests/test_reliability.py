"""Nothing silent, nothing lost (issue 17): every bad input and fault gets one clear line and
exit status 2, or is recovered from; caches and model identities are verified. Tiny models."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from paser.cli import main
from paser.errors import FileError, ModelError, OptionError

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(capsys, *argv):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own type checks (--threads, an int option given 20.7)
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_user_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def sha(path: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.iterdir()) if p.is_file())).hexdigest()


def pool_records(n: int):
    from paser.data import pool_path
    from paser.io.records import load_records

    return load_records(pool_path())[0][:n]


def write_pool(path: Path, n: int = 12) -> Path:
    from paser.io.records import write_jsonl

    write_jsonl(path, [r.to_dict() for r in pool_records(n)])
    return path


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["select", "--limit", "0"], ["--limit", ">= 1", "got 0"]),
        (["select", "--cutoff", "0"], ["--cutoff", ">= 2"]),
        (["select", "--ntm-threshold", "-1"], ["--ntm-threshold", ">= 0.0 and <= 1.0"]),
        (["select", "--budget", "abc"], ["--budget", "abc"]),
        (["select", "--k-min", "9", "--k-max", "3"], ["--k-min", "--k-max"]),
        (["recover", "--max-steps", "-2"], ["--max-steps", ">= 1", "got -2"]),
        (["recover", "--dropout", "1.5"], ["--dropout", "< 1.0", "got 1.5"]),
        (["recover", "--lr", "-1"], ["--lr", "> 0.0"]),
        (["recover", "--template", "llama3"], ["--template", "llama3", "alpaca", "raw"]),
        (["evaluate", "--batch-size", "-1"], ["--batch-size", ">= 1"]),
        (["evaluate", "--tasks", "mmlu_nope"], ["--tasks", "mmlu_nope", "wikitext2"]),
        (["prune", "--sparsity", "1.5"], ["--sparsity", "< 1.0"]),
        (["prune", "--pattern", "4:2"], ["--pattern", "N:M"]),
        (["select", "--threads", "-1"], ["--threads", ">= 1"]),
        (["--threads", "0", "select", "--method", "random"], ["--threads", ">= 1"]),
        (["select", "--limit", "20.7"], ["--limit", "20.7"]),
    ],
)
def test_bad_option_values_are_one_line_exit_2(tmp_path, capsys, argv, needles):
    rc, _, err = run_cli(capsys, *argv, "--out", tmp_path / "o")
    assert_user_error(rc, err, *needles)
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "yaml_text, needles",
    [
        ("limit: 20.7\n", ["line 1", "'limit'", "expected an integer, got 20.7 (not rounded)"]),
        ("pruned: x\nlimit: yes\n", ["line 2", "'limit'", "true/false"]),
        ("method: best\n", ["'method'", "one of paser, random"]),
        ("ntm: 1\n", ["'ntm'", "true or false"]),
        ("k_min: 30\n", ["'k_min'", "--k-max"]),
    ],
)
def test_yaml_option_values_are_checked_with_file_and_line(tmp_path, capsys, yaml_text, needles):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    rc, _, err = run_cli(capsys, "select", "--config", cfg, "--out", tmp_path / "o")
    assert_user_error(rc, err, "c.yaml", *needles)


def test_api_gets_the_same_refusals():
    from paser.config import RecoverArgs, SelectArgs

    with pytest.raises(OptionError, match="--limit: must be >= 1"):
        SelectArgs(limit=0)
    with pytest.raises(OptionError, match="true/false"):
        SelectArgs(limit=True)
    with pytest.raises(OptionError, match="--template"):
        RecoverArgs(template="llama3")
    assert SelectArgs(limit=20.0, budget=0.1).limit == 20 and SelectArgs(budget=0.1).budget == "0.1"


def test_a_new_field_picks_up_its_declared_rules():
    from dataclasses import dataclass

    from paser.config import _f, _Validated, build_args

    @dataclass
    class NewArgs(_Validated):
        warmup: float = _f(0.1, "warm-up share", min=0.0, max=1.0)
        mode: str = _f("a", "mode", choices=("a", "b"))
        rule: str = _f("x", "a registry's entries", choices=lambda: ("x", "y"))

    with pytest.raises(OptionError, match="--warmup"):
        NewArgs(warmup=2.0)
    with pytest.raises(OptionError, match="one of a, b"):
        build_args(NewArgs, {"mode": "c"})
    with pytest.raises(OptionError, match="--rule: must be one of x, y"):
        NewArgs(rule="z")


def test_global_options_after_the_subcommand(tmp_path, capsys):
    from paser.cli import build_parser

    rc, out, err = run_cli(capsys, "select", "--threads", "1", "--method", "random", "--budget", "3", "--limit", "20",
                           "--no-plots", "--no-estimate", "--out", tmp_path / "o")
    assert rc == 0 and "selected 3 of 20" in out, err
    assert torch.get_num_threads() == 1

    ns = build_parser().parse_args(["select", "--threads", "1", "--verbose", "--budget", "3"])
    assert ns.threads == 1 and ns.verbose and ns.budget == "3"
    ns = build_parser().parse_args(["--threads", "2", "select"])
    assert ns.threads == 2 and not ns.verbose


# ----------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize(
    "extra, needles",
    [
        ('methods: ["paser", "best"]', ["'methods'", "best", "paser, random"]),
        ('budgets: ["abc"]', ["'budgets'", "abc"]),
        ("seeds: [x]", ["'seeds'", "'x'"]),
        ("select: [1, 2]", ["'select'", "section"]),
        ("prune: 5", ["'prune'", "section"]),
        ('evaluate: {tasks: "wikitext2,nope"}', ["'tasks'", "nope"]),
        ("pool_limit: 2.5", ["'pool_limit'"]),
    ],
)
def test_pipeline_config_is_checked_before_the_first_stage(tmp_path, capsys, extra, needles):
    out = tmp_path / "run"
    cfg = tmp_path / "exp.yaml"
    base = {"out": str(out), "original": "o", "pruned": "p", "methods": ["random"], "budgets": ["4"], "seeds": [0]}
    key = extra.split(":")[0]
    lines = [f"{k}: {json.dumps(v)}" for k, v in base.items() if k != key] + [extra]
    cfg.write_text("\n".join(lines) + "\n")
    rc, _, err = run_cli(capsys, "pipeline", "--config", cfg)
    assert_user_error(rc, err, "exp.yaml", *needles)
    assert not out.exists()


def test_pipeline_exits_non_zero_when_a_stage_failed(tmp_path, capsys, monkeypatch, tiny_model_dir, tiny_pruned_dir):
    from conftest import write_pipeline_config

    import paser.pipeline as pl

    def broken(*a, **kw):
        raise RuntimeError("unit exploded")

    monkeypatch.setattr(pl.Experiment, "_run_unit", broken)
    cfg = write_pipeline_config(tmp_path / "e.yaml", tiny_model_dir, tiny_pruned_dir, tmp_path / "run", ["random"],
                                extra="include_dense: false\ninclude_unrecovered: false\n")
    rc, out, err = run_cli(capsys, "pipeline", "--config", cfg)
    assert rc == 1 and "1 stage(s) failed" in err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["failures"][0]["error"] == "RuntimeError('unit exploded')"


# ----------------------------------------------------------------------------- output paths


def test_prune_out_equal_to_the_model_is_refused_and_the_model_kept(tmp_path, capsys, tiny_model_dir):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    before = sha(model)
    rc, _, err = run_cli(capsys, "prune", "--model", model, "--out", model, "--ppl-tokens", "0")
    assert_user_error(rc, err, str(model), "overwrite the input")
    rc, _, err = run_cli(capsys, "prune", "--model", model, "--out", tmp_path, "--ppl-tokens", "0")  # a parent of the model
    assert_user_error(rc, err, "overwrite the input")
    assert sha(model) == before
    from paser.prune import run_prune  # the Python API refuses too, before loading

    with pytest.raises(FileError, match="overwrite the input"):
        run_prune(str(model), "magnitude", 0.5, out_dir=str(model), ppl_tokens=0)


def test_out_of_the_wrong_kind_is_refused_before_any_work(tmp_path, capsys, tiny_model_dir):
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = run_cli(capsys, "prune", "--model", tiny_model_dir, "--out", f)
    assert_user_error(rc, err, str(f), "existing file", "directory")
    rc, _, err = run_cli(capsys, "select", "--method", "random", "--out", f)
    assert_user_error(rc, err, "existing file")
    rc, _, err = run_cli(capsys, "evaluate", "--model", tiny_model_dir, "--out", tmp_path)
    assert_user_error(rc, err, "is a directory", "must name a file")
    rc, _, err = run_cli(capsys, "select", "--method", "random", "--out", f / "sub")
    assert_user_error(rc, err, "is a file, not a directory")
    rc, _, err = run_cli(capsys, "recover", "--model", tiny_model_dir, "--data", f, "--out", tiny_model_dir)
    assert_user_error(rc, err, "overwrite the input")


def test_unwritable_out_is_refused(tmp_path, capsys, monkeypatch):
    import paser.config as config

    # As root (the test machine) access() grants everything, so fake the two answers a
    # read-only mount gives; the decision and the message are what is tested.
    monkeypatch.setattr(config.os, "access", lambda p, m: False)
    monkeypatch.setattr(config, "_read_only_fs", lambda d: True)
    rc, _, err = run_cli(capsys, "select", "--method", "random", "--out", tmp_path / "o")
    assert_user_error(rc, err, str(tmp_path / "o"), "read-only file system")


def test_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch, tiny_model_dir):
    import paser.io.cache as cache

    out = tmp_path / "res" / "r.json"
    real = os.fsync

    def full(fd):  # the disk is full where the results go (the evaluation cache is elsewhere)
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(out.parent)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(cache.os, "fsync", full)
    rc, _, err = run_cli(capsys, "evaluate", "--model", tiny_model_dir, "--tasks", "heldout", "--limit", "2", "--out", out)
    assert_user_error(rc, err, str(out), "no space left")
    assert not out.exists() and not [p for p in out.parent.glob("*") if p.name.startswith(".")]


def test_atomic_write_dir_swaps_whole_and_a_failed_writer_keeps_the_old_directory(tmp_path):
    from paser.io.cache import atomic_write_dir

    target = tmp_path / "model"
    assert atomic_write_dir(target, lambda d: (d / "a.txt").write_text("one")) == target
    assert (target / "a.txt").read_text() == "one"

    def broken(d: Path) -> None:
        (d / "b.txt").write_text("half")
        raise RuntimeError("killed half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        atomic_write_dir(target, broken)
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]  # the old directory, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind
    atomic_write_dir(target, lambda d: (d / "c.txt").write_text("two"))
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]  # replaced whole: nothing of the old mixed in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    atomic_write_dir(tmp_path / "new" / "dir", lambda d: (d / "x").write_text(""))  # parents are made
    assert (tmp_path / "new" / "dir" / "x").exists()


# ----------------------------------------------------------------------------- corrupt inputs


def _flip(path: Path, start: int, n: int) -> None:
    b = bytearray(path.read_bytes())
    for k in range(start, min(len(b), start + n)):
        b[k] ^= 0x55
    path.write_bytes(bytes(b))


def test_bit_flipped_jsonl_gz_and_corrupt_parquet_page(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r.to_dict() for r in pool_records(40)]
    gz = tmp_path / "pool.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    _flip(gz, 100, 10)
    rc, _, err = run_cli(capsys, "select", "--method", "random", "--budget", "3", "--data", gz, "--out", tmp_path / "o")
    assert_user_error(rc, err, str(gz), "corrupt")

    pqf = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pqf, compression="snappy")
    _flip(pqf, 200, 60)  # inside the first data page; the footer stays readable
    rc, _, err = run_cli(capsys, "select", "--method", "random", "--budget", "3", "--data", pqf, "--out", tmp_path / "o")
    assert_user_error(rc, err, str(pqf), "corrupt")


def _model_copy(tmp_path, src, name="m") -> Path:
    import shutil

    d = tmp_path / name
    shutil.copytree(src, d)
    return d


@pytest.mark.parametrize("damage", ["truncated", "garbage", "tokenizer", "pickle", "nan"])
def test_damaged_model_files_are_one_line(tmp_path, capsys, tiny_model_dir, tiny_tokenizer, damage):
    from conftest import tiny_llama

    d = _model_copy(tmp_path, tiny_model_dir)
    w = d / "model.safetensors"
    if damage == "truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        needles = [str(w), "damaged or truncated"]
    elif damage == "garbage":
        w.write_bytes(b"not a safetensors file" * 50)
        needles = [str(w), "damaged or truncated"]
    elif damage == "tokenizer":
        t = d / "tokenizer.json"
        t.write_text(t.read_text()[:100])
        needles = [str(t), "cannot load the tokenizer"]
    elif damage == "pickle":
        w.unlink()
        torch.save(tiny_llama(len(tiny_tokenizer)).state_dict(), d / "pytorch_model.bin")
        needles = [str(d / "pytorch_model.bin"), "--allow-pickle"]
    else:
        m = tiny_llama(len(tiny_tokenizer))
        with torch.no_grad():
            m.model.layers[1].self_attn.q_proj.weight[3, 3] = float("nan")
        m.save_pretrained(d)
        needles = [str(d), "model.layers.1.self_attn.q_proj.weight", "NaN"]
    rc, _, err = run_cli(capsys, "evaluate", "--model", d, "--tasks", "heldout", "--limit", "2", "--out", tmp_path / "r.json")
    assert_user_error(rc, err, *needles)


def test_custom_code_refusal_names_an_argument_that_exists(tmp_path, tiny_model_dir):
    import inspect

    from paser.io.models import load_model

    d = _model_copy(tmp_path, tiny_model_dir)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="xcustom", auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as ei:
        load_model(str(d), device="cpu")
    msg = str(ei.value)
    assert "trust_remote_code=True" in msg and "--trust-remote-code" not in msg
    assert "trust_remote_code" in inspect.signature(load_model).parameters


def test_vocabulary_size_mismatch_is_refused_before_scoring(tmp_path, tiny_tokenizer):
    from conftest import tiny_llama

    from paser.io.models import LoadedModel
    from paser.score.engine import score_degradation

    n = len(tiny_tokenizer)
    o = LoadedModel(tiny_llama(n), tiny_tokenizer, "", "fo", "orig")
    p = LoadedModel(tiny_llama(n + 64, seed=1), tiny_tokenizer, "", "fp", "padded")  # a padded vocabulary
    with pytest.raises(ModelError, match=rf"different vocabulary sizes \({n} vs {n + 64}"):
        score_degradation(o, p, pool_records(4), cache_dir=tmp_path, progress=False)
    assert not list(tmp_path.rglob("shard-*.parquet"))


def test_a_real_bug_still_shows_its_traceback(capsys, monkeypatch, tmp_path):
    import paser.api as api

    def bug(args):
        raise KeyError("internal")

    monkeypatch.setattr(api, "estimate", bug)
    rc, _, err = run_cli(capsys, "estimate", "--method", "random")
    assert rc == 1 and "Traceback" in err and "KeyError" in err and "bug in paser; please report it" in err


# ----------------------------------------------------------------------------- identity and caches


def test_replaced_weights_change_the_fingerprint(tmp_path, tiny_model_dir, tiny_pruned_dir, monkeypatch):
    import shutil

    import paser.io.models as models

    d = _model_copy(tmp_path, tiny_model_dir)
    fp0 = models.fingerprint_directory(d)
    # A paser-written directory: the marker holds the fingerprint and the stats it covers.
    (d / "paser_model.json").write_text(json.dumps({"fingerprint": fp0, "files": models._weight_stats(d),
                                                    "fingerprint_version": models.FINGERPRINT_VERSION}))
    calls = []
    real = models.fingerprint_directory
    monkeypatch.setattr(models, "fingerprint_directory", lambda p: calls.append(p) or real(p))
    assert models._cached_dir_fingerprint(d, tmp_path / "c") == fp0 and not calls  # unchanged: trusted, no rehash
    shutil.copyfile(tiny_pruned_dir / "model.safetensors", d / "model.safetensors")  # same name, new bytes
    fp1 = models._cached_dir_fingerprint(d, tmp_path / "c")
    assert fp1 != fp0 and fp1 == real(d) and len(calls) == 1
    assert models._cached_dir_fingerprint(d, tmp_path / "c") == fp1 and len(calls) == 1  # recorded: no third hash
    os.utime(d / "model.safetensors", ns=(0, 0))  # a changed mtime (or ctime, inode, size) is never missed
    assert models._cached_dir_fingerprint(d, tmp_path / "c") == fp1 and len(calls) == 2


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_model_dir, tiny_pruned_dir):
    """Two loaded tiny models, 24 pool records and a clean cache's scores of them."""
    from paser.io.models import load_model
    from paser.score.engine import score_degradation

    torch.set_num_threads(1)
    o = load_model(str(tiny_model_dir), device="cpu")
    p = load_model(str(tiny_pruned_dir), device="cpu")
    recs = pool_records(24)
    clean = score_degradation(o, p, recs, cutoff=64, cache_dir=tmp_path_factory.mktemp("clean"), max_batch_tokens=256, progress=False)
    return o, p, recs, clean


def _store_dir(cache: Path) -> Path:
    (d,) = {s.parent for s in cache.glob("scores/degradation/*/shard-*.parquet")}
    return d


@pytest.mark.parametrize("fault", ["impossible", "nan", "flipped", "truncated"])
def test_bad_score_shards_are_dropped_and_rescored(tmp_path, scored, fault, caplog):
    import pyarrow.parquet as pq

    from paser.io.cache import ShardStore
    from paser.score.engine import score_degradation

    o, p, recs, clean = scored
    cache = tmp_path / "c"
    score_degradation(o, p, recs, cutoff=64, cache_dir=cache, max_batch_tokens=256, flush_every=1, progress=False)
    store = _store_dir(cache)
    shard = sorted(store.glob("shard-*.parquet"))[0]
    if fault in ("impossible", "nan"):  # a valid file with impossible values, as an old or foreign writer could leave
        t = pq.read_table(shard).to_pydict()
        n = len(t["id"])
        t["jsd"] = [50.0, -3.0] * (n // 2) + [50.0] * (n % 2) if fault == "impossible" else [float("nan")] * n
        shard.unlink()
        ShardStore(store).append({k: np.asarray(v) if k != "id" else v for k, v in t.items()})
    elif fault == "flipped":
        _flip(shard, shard.stat().st_size // 2, 8)
    else:
        shard.write_bytes(shard.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="paser"):
        again = score_degradation(o, p, recs, cutoff=64, cache_dir=cache, max_batch_tokens=256, progress=False)
    assert "dropped" in caplog.text
    assert 0 < again.stats.samples_scored < len(recs)  # the bad shard's rows, not the others
    assert np.array_equal(again.jsd, clean.jsd) and np.array_equal(again.nll_pruned, clean.nll_pruned)


_CHILD = """
import sys, time
import torch
torch.set_num_threads(1)
from paser.data import pool_path
from paser.io.models import load_model
from paser.io.records import load_records
import paser.score.engine as eng
o, p = load_model({o!r}, device="cpu"), load_model({p!r}, device="cpu")
collate = eng._collate

def slow_collate(*a, **kw):  # once per batch, at its start: say so, then take a while
    print("BATCH", flush=True)
    time.sleep(0.4)
    return collate(*a, **kw)

eng._collate = slow_collate
recs = load_records(pool_path())[0][:24]
# 100 batches a flush by count: only the time rule (flush_seconds) saves anything before the end.
eng.score_degradation(o, p, recs, cutoff=64, cache_dir={cache!r}, max_batch_tokens=256, flush_every=100, flush_seconds=0.01, progress=False)
print("FINISHED")
"""


def test_kill_during_a_pool_smaller_than_one_flush_loses_at_most_one_batch(tmp_path, scored):
    from paser.score.engine import plan_batches, rank_share, encode_records, score_degradation

    o, p, recs, clean = scored
    items = rank_share(encode_records(recs, o.tokenizer, "alpaca", 64))
    batches = plan_batches([it.length for it in items], 256)
    assert 3 <= len(batches) < 100  # fewer batches than one count-based flush
    cache = tmp_path / "c"
    script = _CHILD.format(o=o.path, p=p.path, cache=str(cache))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None and len(list(cache.glob("scores/degradation/*/shard-*.parquet"))) < 2:
        time.sleep(0.02)
    assert child.poll() is None, child.communicate()[1].decode()[-2000:]
    os.kill(child.pid, signal.SIGKILL)  # kill -9: no handler runs, the lock dies with the process
    started = child.communicate()[0].decode().count("BATCH")  # batches begun before the kill
    resumed = score_degradation(o, p, recs, cutoff=64, cache_dir=cache, max_batch_tokens=256, progress=False)
    assert resumed.stats.samples_cached >= 2  # flushed by time, though the count rule never fired
    # Of the batches begun, only the one in flight when the kill landed is scored again.
    assert resumed.stats.batches <= len(batches) - started + 1, (resumed.stats.batches, len(batches), started)
    assert resumed.stats.samples_scored < len(recs)
    assert np.array_equal(resumed.jsd, clean.jsd)


def test_concurrent_runs_on_one_cache_score_each_sample_once(tmp_path, scored, monkeypatch, caplog):
    import threading

    import paser.score.engine as eng

    o, p, recs, clean = scored
    real = eng.token_jsd_and_nll

    def slow(*a, **kw):
        time.sleep(0.3)
        return real(*a, **kw)

    monkeypatch.setattr(eng, "token_jsd_and_nll", slow)
    results = []

    def run():
        results.append(eng.score_degradation(o, p, recs, cutoff=64, cache_dir=tmp_path, max_batch_tokens=256, progress=False))

    threads = [threading.Thread(target=run) for _ in range(2)]
    with caplog.at_level(logging.INFO, logger="paser"):
        threads[0].start()
        deadline = time.time() + 60
        while not list(tmp_path.glob("scores/degradation/*/lock-r000")) and time.time() < deadline:
            time.sleep(0.01)
        threads[1].start()  # the second run encodes (the tokenizer is not shared while it works), then waits
        for t in threads:
            t.join()
    assert "waiting for pid" in caplog.text
    assert sorted(r.stats.samples_scored for r in results) == [0, len(recs)]
    assert all(np.array_equal(r.jsd, clean.jsd) for r in results)


def test_a_cached_stage_says_cached(tmp_path, scored, caplog):
    from paser.score.engine import score_degradation

    o, p, recs, _ = scored
    score_degradation(o, p, recs, cutoff=64, cache_dir=tmp_path, max_batch_tokens=256, progress=False)
    with caplog.at_level(logging.INFO, logger="paser"):
        again = score_degradation(o, p, recs, cutoff=64, cache_dir=tmp_path, max_batch_tokens=256, progress=True)
    assert again.stats.samples_scored == 0 and f"cached ({len(recs)} samples)" in caplog.text


# ----------------------------------------------------------------------------- outputs


def test_json_is_strict_and_files_respect_the_umask(tmp_path):
    from paser.io.cache import atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": float("nan"), "y": [np.float32("inf"), 1.5], "z": np.array([np.nan])})
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        os.umask(0o077)
        atomic_write_json(tmp_path / "b.json", {})
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)

    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    assert json.loads((tmp_path / "a.json").read_text(), parse_constant=refuse) == {"x": None, "y": [None, 1.5], "z": [None]}


def test_pruning_report_is_strict_json_with_reasons(tmp_path, tiny_model_dir):
    from paser.prune import run_prune

    out = tmp_path / "p"
    # ppl_tokens equal to the window: one window, so no standard error exists
    run_prune(str(tiny_model_dir), "magnitude", 0.5, out_dir=str(out), ppl_tokens=64, ppl_window=64, show_progress=False)
    rep = json.loads((out / "pruning_report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the report"))
    before = rep["perplexity"]["before"]
    assert before["nll_stderr"] is None and "one window" in before["notes"]["nll_stderr"]
    assert isinstance(before["ppl"], float)


# ----------------------------------------------------------------------------- quiet output


def test_third_party_noise_is_silenced_unless_verbose():
    from paser.cli import setup_output

    try:
        setup_output(verbose=False)
        assert not logging.getLogger("faiss.loader").isEnabledFor(logging.INFO)
        assert not logging.getLogger("matplotlib.font_manager").isEnabledFor(logging.WARNING)
        assert logging.getLogger("paser.select").isEnabledFor(logging.INFO)
        with warnings.catch_warnings(record=True) as caught:
            setup_output(verbose=False)  # filters installed inside the recording context
            warnings.warn_explicit("is_gradient_checkpointing is deprecated", FutureWarning, "peft/tuners.py", 1, module="peft.tuners")
            warnings.warn_explicit("paser's own", UserWarning, "paser/x.py", 1, module="paser.x")
        assert [str(w.message) for w in caught] == ["paser's own"]
        setup_output(verbose=True)
        assert logging.getLogger("faiss.loader").level == logging.NOTSET
    finally:
        for name in ("faiss", "faiss.loader", "matplotlib", "transformers", "peft"):
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_damaged_hidden_state_cache_runs_the_original_again(tmp_path, scored, caplog):
    from paser.score.engine import score_degradation

    o, p, recs, clean = scored
    first = score_degradation(o, p, recs, cutoff=64, cache_dir=tmp_path, max_batch_tokens=256, progress=False)
    (blob,) = tmp_path.glob("scores/final_hidden/*/hid-*.npy")
    _flip(blob, blob.stat().st_size - 64, 16)  # inside the float data, where np.load cannot notice
    for s in tmp_path.glob("scores/degradation/*/shard-*.parquet"):
        s.unlink()  # so the JSDs must be recomputed from the (damaged) hidden cache
    with caplog.at_level(logging.WARNING, logger="paser"):
        again = score_degradation(o, p, recs, cutoff=64, cache_dir=tmp_path, max_batch_tokens=256, progress=False)
    assert "hidden-state cache file" in caplog.text and "checksum mismatch" in caplog.text
    assert again.stats.original_forward_samples == len(recs)
    assert np.array_equal(again.jsd, clean.jsd) and np.array_equal(first.jsd, clean.jsd)


def test_shards_written_before_checksums_are_still_read(tmp_path):
    from paser.io.cache import ShardStore, write_parquet_atomic
    from paser.score.engine import validate_degradation_shard

    store = ShardStore(tmp_path, validate=validate_degradation_shard)
    cols = {"id": ["a", "b"], "jsd": np.array([0.1, 0.2]), "nll_original": np.array([1.0, 2.0]), "nll_pruned": np.array([1.5, 2.5])}
    write_parquet_atomic(tmp_path / "shard-r000-0123456789ab.parquet", cols)  # the old name: no checksum part
    store.append({**cols, "id": ["c", "d"]})
    assert store.done_ids() == {"a", "b", "c", "d"}


def test_strict_results_file_and_a_cached_rerun_with_undefined_errors(tmp_path, capsys, tiny_model_dir, monkeypatch):
    """One item: standard errors are undefined (NaN). results.json says null; the private
    evaluation cache keeps NaN, so the cached rerun formats as the first run did."""
    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    outs = []
    for i in range(2):
        rc, out, err = run_cli(capsys, "evaluate", "--model", tiny_model_dir, "--tasks", "heldout,piqa", "--limit", "1",
                               "--out", tmp_path / f"r{i}.json")
        assert rc == 0, err
        outs.append(out.splitlines()[1:-1])
    assert outs[0] == outs[1] and "±nan" in "\n".join(outs[0])
    res = json.loads((tmp_path / "r1.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    assert res["results"]["piqa"]["acc_stderr"] is None and res["results"]["piqa"]["cached"] is True


def test_an_interrupt_keeps_the_finished_batches(tmp_path, scored, monkeypatch):
    import paser.score.engine as eng

    o, p, recs, clean = scored
    real, calls = eng._collate, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third batch
        return real(*a, **kw)

    monkeypatch.setattr(eng, "_collate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        eng.score_degradation(o, p, recs, cutoff=64, cache_dir=tmp_path, max_batch_tokens=256, progress=False)
    monkeypatch.setattr(eng, "_collate", real)
    resumed = eng.score_degradation(o, p, recs, cutoff=64, cache_dir=tmp_path, max_batch_tokens=256, progress=False)
    first_two = sum(e - s for s, e in eng.plan_batches([it.length for it in eng.rank_share(eng.encode_records(recs, o.tokenizer, "alpaca", 64))], 256)[:2])
    assert resumed.stats.samples_cached == first_two  # the count rule (8 batches) never fired: saved on the interrupt
    assert np.array_equal(resumed.jsd, clean.jsd)


def test_fingerprint_ignores_who_saved_the_config(tmp_path, tiny_model_dir, monkeypatch):
    """The same weights saved by another transformers version (another machine) keep their
    fingerprint; a change to what the config says about the model does not; a fingerprint
    stored under an older definition is recomputed, not trusted."""
    import paser.io.models as models

    a, b = _model_copy(tmp_path / "a", tiny_model_dir), _model_copy(tmp_path / "b", tiny_model_dir)
    cfg = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps({**cfg, "transformers_version": "0.0.1", "_name_or_path": "/elsewhere"}, indent=4))
    assert models.fingerprint_directory(a) == models.fingerprint_directory(b)
    (b / "config.json").write_text(json.dumps({**cfg, "rope_theta": 1.0}))
    assert models.fingerprint_directory(a) != models.fingerprint_directory(b)

    (a / "paser_model.json").write_text(json.dumps({"fingerprint": "0123456789abcdef", "files": models._weight_stats(a)}))
    assert models._cached_dir_fingerprint(a, tmp_path / "c") == models.fingerprint_directory(a)
