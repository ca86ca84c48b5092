"""The functions paser's lm-eval task YAMLs name with `!function utils.<name>`.

lm-eval imports this file by its path (the YAML's directory), so the YAMLs work with a plain
`lm_eval --include_path <paser/evaluate/tasks>`: each task reads paser's embedded data
through `custom_dataset` instead of a data file whose path would depend on the machine.
`--metadata '{"paser_limit": N, "paser_seed": S}'` takes the same seeded subset as
`paser evaluate --limit N --seed S` (lm-eval passes the metadata to `custom_dataset`).
"""

from __future__ import annotations


def _dataset(task: str, paser_limit=None, paser_seed=0, **_ignored):
    """{"test": Dataset} of one embedded task (its seeded subset when paser_limit is set);
    each doc keeps its position in the full file as `paser_index`."""
    import datasets

    from paser.data import load_commonsense
    from paser.evaluate.zeroshot import subset_indices

    docs = load_commonsense(task)
    limit = None if paser_limit in (None, "", 0) else int(paser_limit)
    idx = subset_indices(len(docs), limit, int(paser_seed or 0))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{**docs[i], "paser_index": i} for i in idx])})


def boolq(**kw):
    return _dataset("boolq", **kw)


def piqa(**kw):
    return _dataset("piqa", **kw)


def hellaswag(**kw):
    return _dataset("hellaswag", **kw)


def winogrande(**kw):
    return _dataset("winogrande", **kw)


def arc_easy(**kw):
    return _dataset("arc_easy", **kw)


def arc_challenge(**kw):
    return _dataset("arc_challenge", **kw)


def openbookqa(**kw):
    return _dataset("openbookqa", **kw)


def hellaswag_process_docs(dataset):
    """lm-eval's hellaswag process_docs on our fields: its `preprocess` of query and endings
    (ctx_b capitalised as `zeroshot._hellaswag_context` explains)."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    from paser.evaluate.zeroshot import _hellaswag_context

    def _one(doc):
        return {"query": preprocess(_hellaswag_context(doc["query"])), "choices": [preprocess(e) for e in doc["endings"]]}

    return dataset.map(_one)
