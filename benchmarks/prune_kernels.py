"""Is a pruned model the same on every machine? Prune under several CPU kernel settings and compare.

On one machine, pruning is bit-reproducible (re-runs and thread counts give the same weights).
Across machines it need not be: torch picks its vectorised kernels (ATen's AVX2 or AVX-512
code) and MKL its GEMM code by the CPU it finds, and each sums floating-point numbers in its own
order. Wanda keeps the weights above a threshold of |W|·‖x‖, so a different last bit can move a
weight that sits at the threshold across it, and layer by layer the changed outputs of one layer
change the activations, hence the scores, of the next. This script forces the kernel choices
that the libraries expose (`ATEN_CPU_CAPABILITY`, `MKL_ENABLE_INSTRUCTIONS`; each is read when
the library loads, so every setting runs in its own process) and reports each pruned model's
fingerprint and the fraction of mask entries that differ from the default run's.

    .venv/bin/python benchmarks/prune_kernels.py [--model smollm2-135m] [--n-calibration 32] [--out DIR]

The recovery benchmark's archive records the fingerprint each row was made with; the README
gives what the difference is worth in its metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# name -> environment; "default" lets the libraries choose by the CPU, as a user's run does.
SETTINGS = {
    "default": {},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "mkl-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "aten-avx2+mkl-avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}

_PRUNE = """
import json, sys
from paser import api
from paser.io.models import fingerprint_directory
model, out, n_cal = sys.argv[1], sys.argv[2], int(sys.argv[3])
api.prune(model=model, out=out, method="wanda", sparsity=0.5, n_calibration=n_cal, ppl_tokens=0)
print("RESULT " + json.dumps({"fingerprint": fingerprint_directory(out)}))
"""


def prune_under(env: dict[str, str], model: str, out: Path, n_calibration: int) -> str:
    """The fingerprint of a Wanda-50 % prune made in a fresh process with `env` added."""
    proc = subprocess.run([sys.executable, "-c", _PRUNE, model, str(out), str(n_calibration)],
                          env={**os.environ, **env}, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"pruning under {env} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])["fingerprint"]


def mask_difference(a: Path, b: Path) -> tuple[int, int]:
    """(entries whose zero/non-zero state differs, entries) over the decoder layers' matrices."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    diff = total = 0
    for name, t in wa.items():
        if t.dim() == 2 and ".layers." in name:
            diff += int(((t == 0) != (wb[name] == 0)).sum())
            total += t.numel()
    return diff, total


def compare(root: Path, model: str, n_calibration: int) -> int:
    """Prune under every setting into `root`, print the fingerprints and the mask differences."""
    results = {}
    for name, env in SETTINGS.items():
        out = root / name
        results[name] = prune_under(env, model, out, n_calibration)
        print(f"{name:20s} fingerprint {results[name]}", flush=True)
    print(f"\n{'setting':20s} {'fingerprint':16s} mask entries differing from default")
    for name, fp in results.items():
        diff, total = mask_difference(root / "default", root / name)
        print(f"{name:20s} {fp:16s} {diff:,} of {total:,} ({diff / total:.4%})")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model to prune (default smollm2-135m)")
    ap.add_argument("--n-calibration", type=int, default=32, help="calibration records (the recovery benchmark's: 32)")
    ap.add_argument("--out", type=Path, default=None,
                    help="keep the pruned models here (default: a temporary folder, removed at the end)")
    args = ap.parse_args()
    if args.out is not None:
        return compare(args.out, args.model, args.n_calibration)
    with tempfile.TemporaryDirectory(prefix="paser-prune-kernels-") as tmp:  # 0.5 GB a model
        return compare(Path(tmp), args.model, args.n_calibration)


if __name__ == "__main__":
    sys.exit(main())
