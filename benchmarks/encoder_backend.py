"""Sentence-encoder backends on CPU: speed against torch, and whether the S2RIC clusters stay.

Backends: ``torch`` (what paser runs), ``onnx`` (the encoder's transformer exported by torch's
TorchScript exporter, opset 17, from the local files with no network, run by onnxruntime;
sentence-transformers' own tokenisation, pooling and normalisation) and ``onnx-int8``
(onnxruntime's dynamic int8 quantisation of that export). Not sentence-transformers'
``backend="onnx"``/``"openvino"``: their optimum packages cannot be installed beside paser's
transformers (see paser/select/embed.py). paser offers no backend option because neither was
faster at equal clusters here; this script is how to re-check on another CPU.

Embeds ``--n`` records of the embedded pool (the seeded subset `paser select --limit N`
uses) with the torch backend and with each other backend, at the same thread count, and
reports records per second, the speed ratio, the largest |Δ| of the unit vectors, and the
adjusted Rand index of the S2RIC clusters (same K, same seed) against torch's float32 ones
(goal ARI >= 0.95, issue 18). Nothing is cached: both backends embed every record cold,
each after one warm-up batch (the ONNX export, a one-time cost, is timed separately).

    PYTHONPATH=src python benchmarks/encoder_backend.py --n 2000 --threads 1 --out benchmarks/results/encoder_backend/n2000.json

Needs onnxruntime and onnx in the environment (pip install onnxruntime onnx; a separate venv
that sees paser's packages is enough).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path


class OnnxEncoder:
    """The embedded encoder with its transformer in onnxruntime (exported once into ``export_dir``)."""

    def __init__(self, export_dir: Path, int8: bool = False, threads: int = 1):
        import onnxruntime as ort
        import torch

        from paser.select.embed import default_model_dir, load_encoder

        self.st = st = load_encoder(default_model_dir(), "cpu")
        probe = self._tokenize(["an example sentence", "a second, longer example sentence to pad the first"])
        self.names = names = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in probe]
        path = Path(export_dir) / "encoder.onnx"
        if not path.exists():
            model = st[0].auto_model.eval()

            class Wrapped(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.m = model

                def forward(self, *args):
                    return self.m(**dict(zip(names, args))).last_hidden_state

            axes = {k: {0: "batch", 1: "seq"} for k in [*names, "token_embeddings"]}
            with torch.no_grad():
                torch.onnx.export(Wrapped(), tuple(probe[k] for k in names), str(path), input_names=names,
                                  output_names=["token_embeddings"], dynamic_axes=axes, opset_version=17, dynamo=False)
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            q = path.with_name("encoder-int8.onnx")
            if not q.exists():
                quantize_dynamic(str(path), str(q), weight_type=QuantType.QInt8)
            path = q
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def _tokenize(self, texts):
        return (getattr(self.st, "preprocess", None) or self.st.tokenize)(texts)

    def encode(self, texts, batch_size: int = 64):
        import numpy as np
        import torch

        order = np.argsort([-len(t) for t in texts], kind="stable")  # as sentence-transformers' encode
        out = np.zeros((len(texts), (getattr(self.st, "get_embedding_dimension", None) or self.st.get_sentence_embedding_dimension)()), np.float32)
        for s in range(0, len(texts), batch_size):
            idx = order[s : s + batch_size]
            feats = self._tokenize([texts[i] for i in idx])
            tok = self.session.run(None, {k: feats[k].numpy().astype(np.int64) for k in self.names})[0]
            feats["token_embeddings"] = torch.from_numpy(tok)
            with torch.no_grad():
                for module in list(self.st)[1:]:  # pooling, normalisation: sentence-transformers' own
                    feats = module(feats)
            out[idx] = feats["sentence_embedding"].numpy()
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def embed(texts, backend: str, export_dir: Path, threads: int, batch_size: int, _cache: dict = {}):
    from paser.select.embed import embed_texts

    if backend == "torch":
        return embed_texts(texts, batch_size=batch_size, show_progress=False)
    if backend not in _cache:
        _cache[backend] = OnnxEncoder(export_dir, int8=backend == "onnx-int8", threads=threads)
    return _cache[backend].encode(texts, batch_size)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backends", default="onnx,onnx-int8")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    from sklearn.metrics import adjusted_rand_score

    from paser.config import SelectArgs
    from paser.select.cluster import semantic_clusters
    from paser.select.embed import record_text
    from paser.select.pool import load_selection_pool

    records, _ = load_selection_pool(SelectArgs(limit=a.n, seed=0))
    texts = [record_text(r) for r in records]
    rows = {}

    def timed(backend, export_dir):
        t = time.perf_counter()
        embed(texts[: a.batch_size], backend, export_dir, a.threads, a.batch_size)  # load (and export) + warm-up
        load = time.perf_counter() - t
        t = time.perf_counter()
        X = embed(texts, backend, export_dir, a.threads, a.batch_size)
        return X, time.perf_counter() - t, load

    with tempfile.TemporaryDirectory() as tmp:
        ref, secs, load = timed("torch", None)
        ref_clusters = semantic_clusters(ref, seed=0)
        rows["torch"] = dict(records_per_s=len(texts) / secs, seconds=secs, load_s=load, k=ref_clusters.k)
        for be in a.backends.split(","):
            X, secs, load = timed(be, Path(tmp))
            cl = semantic_clusters(X, k=ref_clusters.k, seed=0)
            rows[be] = dict(records_per_s=len(texts) / secs, seconds=secs, load_and_export_s=load,
                            speed_ratio=rows["torch"]["seconds"] / secs,
                            max_abs_diff=float(np.abs(X - ref).max()),
                            min_cosine=float((X * ref).sum(1).min()),
                            ari_vs_torch=float(adjusted_rand_score(ref_clusters.labels, cl.labels)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    out = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit=commit, machine=platform.processor() or platform.machine(),
               cpus=os.cpu_count(), threads=a.threads, n=len(texts), batch_size=a.batch_size, rows=rows)
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
