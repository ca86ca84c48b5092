"""paser.evaluate: zero-shot metrics, held-out loss, perplexity and the driver, on a tiny model."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import transformers

from conftest import tiny_llama

from paser.data import COMMONSENSE_TASKS, load_commonsense
from paser.errors import PaserError
from paser.evaluate import heldout, runner, zeroshot
from paser.evaluate.perplexity import perplexity


def _tiny_tokenizer():
    """A real byte-level BPE (GPT-2 style, like SmolLM2's), trained in memory on task text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [json.dumps(d) for t in COMMONSENSE_TASKS for d in load_commonsense(t)[:15]]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def tiny():
    tok = _tiny_tokenizer()
    return tiny_llama(len(tok), max_position_embeddings=1024, tie_word_embeddings=False), tok


def _hand_loglik(model, tok, ctx: str, cont: str) -> float:
    """Direct: one unpadded forward of the whole string, sum of log-softmax at the continuation."""
    n_ctx = len(tok(ctx.rstrip())["input_ids"])
    ids = tok(ctx + cont)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return float(sum(logp[j - 1, ids[j]] for j in range(n_ctx, len(ids))))


@pytest.mark.parametrize("task", ["boolq", "hellaswag", "winogrande", "arc_challenge"])
def test_metrics_match_hand_computation(tiny, task):
    model, tok = tiny
    res = zeroshot.evaluate_task(model, tok, task, limit=6, seed=3, batch_size=4, show_progress=False)
    docs = load_commonsense(task)
    accs, norms, golds_ll = [], [], []
    for k, i in enumerate(res.indices):
        it = zeroshot.format_item(task, docs[i], i)
        lls = [_hand_loglik(model, tok, c, x) for c, x in it.requests]
        np.testing.assert_allclose(res.lls[k], lls, atol=2e-4)
        lens = [len(c) for c in it.choices]
        accs.append(float(np.argmax(lls) == it.gold))
        norms.append(float(np.argmax(np.array(lls) / lens) == it.gold))
        golds_ll.append(lls[it.gold])
    assert res.n == 6 and res.metrics["acc"] == pytest.approx(np.mean(accs))
    assert res.metrics["acc_norm"] == pytest.approx(np.mean(norms))
    assert res.metrics["acc_stderr"] == pytest.approx(np.std(accs, ddof=1) / math.sqrt(6))
    assert res.metrics["gold_loglik"] == pytest.approx(np.mean(golds_ll), abs=1e-3)
    assert res.metrics["gold_choice_logprob"] <= 0


def test_shared_prefix_equals_direct(tiny):
    model, tok = tiny
    items, _ = zeroshot.load_items("hellaswag", 5, 0)
    reqs = [r for it in items for r in it.requests]
    a = zeroshot.loglikelihoods(model, tok, reqs, batch_size=3, show_progress=False)
    b = zeroshot.loglikelihoods(model, tok, reqs, batch_size=2, share_prefix=False, show_progress=False)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_prompt_formats_follow_lm_eval():
    boolq = zeroshot.format_item("boolq", load_commonsense("boolq")[0], 0)
    assert boolq.requests[0][0].endswith("?\nAnswer:") and not boolq.requests[0][0].startswith("Passage:")
    assert [c for _, c in boolq.requests] == [" no", " yes"]
    piqa = zeroshot.format_item("piqa", load_commonsense("piqa")[0], 0)
    assert piqa.requests[0][0].startswith("Question: ") and piqa.requests[0][0].endswith("\nAnswer:")
    wg = zeroshot.format_item("winogrande", load_commonsense("winogrande")[0], 0)
    assert wg.requests[0][1] == wg.requests[1][1] and wg.requests[0][1].startswith(" ")
    assert wg.requests[0][0] != wg.requests[1][0]
    hs = zeroshot.format_item("hellaswag", {"query": "Roof: A man is on a roof. he", "label": 0, "endings": ["a [title] b", "c"]}, 0)
    assert hs.requests[0] == ("Roof: A man is on a roof. He", " a. b")


def test_item_metrics_ties_and_norm():
    m = zeroshot.item_metrics([-4.0, -4.0, -6.0], ["ab", "abcd", "abcdefgh"], gold=0)
    assert m["acc"] == 1.0  # np.argmax: the first of equal maxima
    assert m["acc_norm"] == 0.0  # -6/8 is the largest
    assert m["gold_choice_logprob"] == pytest.approx(-4.0 - np.log(2 * np.exp(-4.0) + np.exp(-6.0)))


def test_limit_subset_is_deterministic():
    a = zeroshot.subset_indices(1000, 50, 7)
    assert a == zeroshot.subset_indices(1000, 50, 7) and len(set(a)) == 50 and a == sorted(a)
    assert a != zeroshot.subset_indices(1000, 50, 8)
    assert set(a) <= set(zeroshot.subset_indices(1000, 80, 7))  # larger limits extend smaller ones
    assert zeroshot.subset_indices(10, None, 0) == list(range(10))
    i1, _ = zeroshot.load_items("piqa", 5, 1)
    i2, _ = zeroshot.load_items("piqa", 5, 1)
    assert [x.index for x in i1] == [x.index for x in i2]


def test_perplexity_equals_direct_exp_mean_nll(tiny):
    model, tok = tiny
    text = " ".join(d["question"] for d in load_commonsense("arc_easy")[:60])
    r = perplexity(model, tok, text, window=64, max_tokens=320, batch_size=2, show_progress=False)
    ids = tok(text, add_special_tokens=False)["input_ids"][:320]
    losses = []
    with torch.no_grad():
        for s in range(0, 320, 64):
            w = torch.tensor([ids[s : s + 64]])
            losses.append(float(model(w, labels=w).loss))  # HF: mean NLL of tokens 1..63
    assert r.n_windows == 5 and r.n_tokens == 5 * 63
    assert r.ppl == pytest.approx(math.exp(np.mean(losses)), rel=1e-4)


def test_leading_token_ids_equal_full_tokenisation(tiny):
    from paser.data import ppl_text
    from paser.evaluate.perplexity import leading_token_ids

    _, tok = tiny
    text = ppl_text("wikitext2")[:60000]
    full = tok(text, add_special_tokens=False)["input_ids"]
    for n in (100, 3000):
        assert leading_token_ids(tok, text, n).tolist() == full[:n]


def test_heldout_loss_matches_direct(tiny):
    from paser.io.records import Record
    from paser.io.templates import encode_example

    model, tok = tiny
    recs = [Record("Add the numbers.", f"{i} and {i + 3}", f"The sum is {2 * i + 3}.", extra={"capability": c})
            for i, c in enumerate(["math", "math", "math", "general", "general", "code"])]
    out = heldout.heldout_loss(model, tok, recs, batch_size=4, show_progress=False)
    caps = out["capabilities"]
    assert caps["math"]["n"] == 3 and caps["all"]["n"] == 6

    def direct(r):
        e = encode_example(r, tok)
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            return float(model(ids, labels=torch.tensor([e.labels()])).loss)

    per = [direct(r) for r in recs[:3]]
    assert caps["math"]["loss"] == pytest.approx(np.mean(per), rel=1e-4)
    assert caps["math"]["loss_stderr"] == pytest.approx(np.std(per, ddof=1) / math.sqrt(3), rel=1e-3)
    limited = heldout.heldout_loss(model, tok, recs, limit=1, seed=0, show_progress=False)
    assert limited["capabilities"]["all"]["n"] == 3


def test_heldout_loss_of_a_model_without_a_separate_head(tiny):
    """A model that only hands back logits is scored by full forwards, to the same numbers."""
    from types import SimpleNamespace

    from paser.io.records import Record

    model, tok = tiny

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, **kw):
            return SimpleNamespace(logits=self.inner(input_ids=input_ids).logits)

    recs = [Record("Say it.", "", f"Number {i} is here.", extra={"capability": "general"}) for i in range(5)]
    split = heldout.heldout_loss(model, tok, recs, batch_size=2, show_progress=False)
    plain = heldout.heldout_loss(LogitsOnly(model), tok, recs, batch_size=2, show_progress=False)
    assert plain["record_loss"] == pytest.approx(split["record_loss"], rel=1e-5)


def test_resolve_tasks():
    assert runner.resolve_tasks(["commonsense"]) == list(COMMONSENSE_TASKS)
    assert runner.resolve_tasks("wikitext2,arc_e,wikitext") == ["wikitext2", "arc_easy"]
    assert set(runner.resolve_tasks(["all"])) == set(runner.VALID_TASKS)
    with pytest.raises(PaserError, match="unknown evaluation task"):
        runner.resolve_tasks(["mmlu"])


def test_evaluate_model_with_adapter_dir_and_cache(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    torch.manual_seed(1)
    peft_model = get_peft_model(transformers.LlamaForCausalLM(model.config).eval(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.base_model.model.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a trained-looking adapter: it must change the numbers
    peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
    ad_dir = tmp_path / "adapter"
    peft_model.save_pretrained(ad_dir)

    kw = dict(limit=4, seed=0, ppl_window=32, ppl_max_tokens=96, batch_size=4, cache_dir=tmp_path / "cache", show_progress=False)
    res_a = runner.evaluate_model(str(ad_dir), ["arc_easy", "wikitext2"], out_path=tmp_path / "a.json", **kw)
    res_b = runner.evaluate_model(str(base_dir), ["arc_easy", "wikitext2"], out_path=tmp_path / "b.json", **kw)
    assert res_a["model"]["adapter"] == str(ad_dir) and res_a["model"]["adapter_fingerprint"]
    assert res_a["model"]["fingerprint"] != res_b["model"]["fingerprint"]
    assert res_a["model"]["base_fingerprint"] == res_b["model"]["fingerprint"]
    assert res_a["results"]["wikitext2"]["ppl"] != pytest.approx(res_b["results"]["wikitext2"]["ppl"])
    assert res_b["results"]["arc_easy"]["n"] == 4 and res_b["results"]["wikitext2"]["n_windows"] == 3
    on_disk = json.loads((tmp_path / "b.json").read_text())
    assert on_disk["perplexity"] == {"window": 32, "max_tokens": 96} and on_disk["versions"]["torch"]
    assert "git_revision" in on_disk and on_disk["results"]["arc_easy"]["seconds"] >= 0
    # Re-running with one more task computes only the new one.
    res_c = runner.evaluate_model(str(base_dir), ["arc_easy", "wikitext2", "piqa"], out_path=None, **kw)
    assert res_c["results"]["arc_easy"]["cached"] and res_c["results"]["wikitext2"]["cached"]
    assert not res_c["results"]["piqa"]["cached"]
    assert res_c["results"]["arc_easy"]["acc"] == res_b["results"]["arc_easy"]["acc"]


def test_adapter_without_base_is_a_clear_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(PaserError, match="base_model_name_or_path"):
        runner.load_for_evaluation(str(tmp_path))


def test_lm_eval_agrees_on_tiny_model(tiny):
    """lm-eval itself (its HFLM on the loaded model, the shipped YAMLs) and paser's scorer on the
    same seeded items: every per-choice log-likelihood within 1e-4 (the bound the README states,
    against lm-eval with a float64 log-softmax; see zeroshot's notes), acc and acc_norm equal."""
    pytest.importorskip("lm_eval")
    from paser.evaluate.tasks import lm_eval_crosscheck

    model, tok = tiny
    tasks = ["boolq", "winogrande", "hellaswag"]  # two choices; partial scoring; long continuations
    ref = lm_eval_crosscheck(model, tok, tasks, limit=6, seed=2)
    for t in tasks:
        ours = zeroshot.evaluate_task(model, tok, t, limit=6, seed=2, show_progress=False)
        assert ours.indices == ref[t]["indices"]
        np.testing.assert_allclose(np.concatenate(ours.lls), np.concatenate(ref[t]["lls"]), rtol=0, atol=1e-4)
        assert ours.metrics["acc"] == pytest.approx(ref[t]["acc"])
        assert ours.metrics["acc_norm"] == pytest.approx(ref[t]["acc_norm"])


@pytest.mark.slow
def test_real_model_small(tmp_path):
    res = runner.evaluate_model(
        "smollm2-135m", ["arc_easy", "piqa", "wikitext2"], limit=8, seed=0, out_path=tmp_path / "r.json",
        ppl_window=512, ppl_max_tokens=1024, cache_dir=tmp_path / "cache", show_progress=False,
    )
    r = res["results"]
    from paser.data import ppl_text
    from paser.evaluate.perplexity import leading_token_ids
    from paser.io.models import load_model

    tok = load_model("smollm2-135m").tokenizer
    text = ppl_text("wikitext2")
    assert leading_token_ids(tok, text, 1024).tolist() == tok(text, add_special_tokens=False)["input_ids"][:1024]
    assert 5 < r["wikitext2"]["ppl"] < 100  # dense SmolLM2-135M: ~33 at window 512 (docs/METHOD.md §3b)
    assert r["arc_easy"]["n"] == 8 and r["piqa"]["n"] == 8
    # The gold choice's probability among the choices is a real distribution's (finite, below 1).
    # 8 items are too few to demand better than chance: the dense model itself is near it, and
    # summed log-likelihoods of choices of unequal length (PIQA) make it far from uniform.
    for task in ("arc_easy", "piqa"):
        assert math.isfinite(r[task]["gold_choice_logprob"]) and r[task]["gold_choice_logprob"] < 0
        assert 0.0 <= r[task]["acc"] <= 1.0 and 0.0 <= r[task]["acc_norm"] <= 1.0


# ----------------------------------------------------------------------------- lm-eval tasks


def _local_lm_eval_task(root, n: int = 12):
    """A tiny lm-eval task of the user's own: a YAML and its JSONL data, nothing downloaded."""
    data = root / "yesno.jsonl"
    data.write_text("".join(json.dumps({"q": f"Is {i} an even number?", "label": int(i % 2 == 0)}) + "\n" for i in range(n)))
    (root / "yesno.yaml").write_text(
        "task: my_yesno\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"  # lm-eval resolves relative paths from the cwd
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{q}}\\nAnswer:"\n'
        'doc_to_choice: ["no", "yes"]\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return root


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    model, tok = tiny
    d = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_cli_evaluates_a_local_lm_eval_task_offline(tiny, tiny_dir, tmp_path, monkeypatch, capsys):
    """`paser evaluate --tasks lm_eval:NAME --include-path DIR`: lm-eval's own scoring of the
    user's task on the loaded model, the seeded subset, paser's results file and cache."""
    pytest.importorskip("lm_eval")
    from paser.cli import main

    (tmp_path / "tasks_dir").mkdir()
    inc = _local_lm_eval_task(tmp_path / "tasks_dir")
    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "r.json"
    argv = ["evaluate", "--model", str(tiny_dir), "--tasks", "lm_eval:my_yesno,arc_easy", "--include-path", str(inc),
            "--limit", "5", "--seed", "1", "--out", str(out), "--batch-size", "4"]
    assert main(argv) == 0
    assert "lm_eval:my_yesno" in capsys.readouterr().out
    res = json.loads(out.read_text())
    r = res["results"]["lm_eval:my_yesno"]
    assert r["n"] == {"my_yesno": 5} and r["n_total"] == {"my_yesno": 12} and not r["cached"]
    assert r["headline"]["metric"] == "acc,none" and 0.0 <= r["headline"]["value"] <= 1.0
    items = r["items"]["my_yesno"]
    assert items["indices"] == zeroshot.subset_indices(12, 5, 1)  # the same subset rule as paser's tasks
    # lm-eval's per-choice log-likelihoods are those of paser's own scorer on the same requests
    model, tok = tiny
    reqs = [(f"Question: Is {i} an even number?\nAnswer:", f" {c}") for i in items["indices"] for c in ("no", "yes")]
    ours = zeroshot.loglikelihoods(model, tok, reqs, show_progress=False)
    np.testing.assert_allclose(np.concatenate(items["lls"]), ours, atol=1e-4)
    assert r["headline"]["value"] == pytest.approx(np.mean([float(np.argmax(ll) == g) for ll, g in zip(items["lls"], items["golds"])]))
    assert res["summary"]["lm_eval"]["lm_eval:my_yesno"]["metric"] == "acc,none" and "mean_acc" in res["summary"]
    # the second run reads both tasks from the cache
    assert main(argv) == 0
    again = json.loads(out.read_text())["results"]
    assert again["lm_eval:my_yesno"]["cached"] and again["arc_easy"]["cached"]
    assert again["lm_eval:my_yesno"]["headline"] == r["headline"]


@pytest.mark.slow  # a name found nowhere needs lm-eval's whole registry indexed (~10 s)
def test_unknown_lm_eval_task_is_one_line(tiny_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from paser.cli import main

    inc = _local_lm_eval_task(tmp_path)
    assert main(["evaluate", "--model", str(tiny_dir), "--tasks", "lm_eval:my_yesnoo", "--include-path", str(inc),
                 "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "lm-eval has no task 'my_yesnoo'" in err and "my_yesno" in err and "Traceback" not in err


def test_lm_eval_task_errors_are_one_line(tiny_dir, tmp_path):
    pytest.importorskip("lm_eval")
    with pytest.raises(PaserError, match="not a directory"):
        runner.evaluate_model(str(tiny_dir), ["lm_eval:my_yesno"], limit=2, seed=0, out_path=None,
                              include_path=tmp_path / "missing", use_cache=False, show_progress=False)
    with pytest.raises(PaserError, match="give an lm-eval task name"):
        runner.resolve_tasks("lm_eval:")
    assert runner.resolve_tasks("ppl,lm_eval:MyTask,lm_eval:MyTask") == ["wikitext2", "ptb", "lm_eval:MyTask"]


def test_shipped_task_yamls_work_with_a_plain_lm_eval_include_path():
    """What `lm_eval --include_path paser/evaluate/tasks --tasks paser_arc_easy --metadata
    '{"paser_limit": 5, "paser_seed": 2}'` does: no data file to fill in, paser's seeded subset."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from paser.evaluate.tasks import TASKS_DIR

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"paser_limit": 5, "paser_seed": 2})
    assert {f"paser_{t}" for t in COMMONSENSE_TASKS} <= set(tm.all_tasks)
    task = tm.load(["paser_arc_easy"])["tasks"]["paser_arc_easy"]
    docs = list(task.eval_docs)
    assert [d["paser_index"] for d in docs] == zeroshot.subset_indices(len(load_commonsense("arc_easy")), 5, 2)
    it = zeroshot.format_item("arc_easy", load_commonsense("arc_easy")[docs[0]["paser_index"]], 0)
    assert task.doc_to_text(docs[0]) == it.requests[0][0]  # lm-eval's prompt is paser's
    full = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load(["paser_boolq"])["tasks"]["paser_boolq"]
    assert len(full.eval_docs) == len(load_commonsense("boolq"))


def test_lm_eval_runs_are_offline_unless_the_user_opts_in(monkeypatch):
    """No network at run time: the hub and datasets flags (read at import time) are forced on for
    the run and put back after; HF_HUB_OFFLINE=0 set by the user lets lm-eval download."""
    import datasets.config
    import huggingface_hub.constants as hub

    from paser.evaluate.lm_eval_tasks import offline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with offline():
        assert hub.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    assert not hub.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE and "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with offline():
        assert not hub.HF_HUB_OFFLINE


def test_the_api_evaluates_a_model_in_memory_as_its_directory(tmp_path, tiny_model_dir):
    """api.evaluate(model=<module>, tokenizer=...) gives the numbers the saved directory gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from paser import api
    from paser.errors import PaserError

    opts = dict(tasks="wikitext2", ppl_tokens=256, ppl_window=64, limit=None)
    want = api.evaluate(model=str(tiny_model_dir), out=str(tmp_path / "dir.json"), **opts)
    m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    got = api.evaluate(model=m, tokenizer=tok, out=str(tmp_path / "mem.json"), **opts)
    assert got.results["results"]["wikitext2"]["ppl"] == pytest.approx(want.results["results"]["wikitext2"]["ppl"], rel=1e-6)
    assert got.results["model"]["name"].endswith("(in memory)")
    with pytest.raises(PaserError, match="tokenizer"):
        api.evaluate(model=m, out=str(tmp_path / "x.json"), **opts)
