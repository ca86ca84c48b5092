"""The pruning driver: owns the model, the hooks and the files; the maths lives in the method modules.

Layer by layer, as Wanda and SparseGPT do ("sequential"): the calibration hidden states that
enter decoder layer i are the outputs of layers < i that are already pruned, so each layer is
calibrated on what it will really see. For each layer: one pass of the dense layer with forward
hooks on its linears gathers the statistics (column norms, Hessians, activation norms); the
layer is pruned; one more pass of the pruned layer gives the next layer's inputs.

Only the nn.Linear modules inside the decoder layers are touched: never the embeddings nor the
LM head (tied to the embeddings in SmolLM2 and many small models, so pruning one would prune both).

Design after vllm-project/llm-compressor (pure sparsify functions apart from the modifier that
owns hooks and state). We do not use llm-compressor itself: version 0.14 pins transformers
<= 5.17 (paser needs 5.24) and brings ~1.5 GB of dependencies.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from paser.io.adapter import ATTENTION_PROJECTIONS, decoder_layers, layers_prefix, structured_shapes
from paser.errors import PaserError
from paser.prune.calibration import Calibration, load_calibration, tokenize_calibration
from paser.prune.methods import PRUNING_METHODS
from paser.prune.masks import parse_pattern, pattern_sparsity, zero_fraction
from paser.prune.sparsegpt import update_hessian
from paser.prune.structured import (
    IMPORTANCES,
    StructuredPlan,
    head_group_importance,
    keep_top,
    kv_rows_of_heads,
    mlp_channel_importance,
    plan_structured,
    query_rows_of_groups,
    reconstruct_kept_columns,
    slice_cols,
    slice_rows,
)
from paser.prune.wanda import update_column_sq_norms

log = logging.getLogger(__name__)

METHODS = tuple(PRUNING_METHODS)  # the registered methods (paser.prune.methods)
# Structured defaults, chosen by measurement on SmolLM2-135M at 25 % (all 30 layers, 32 pool
# records = 4,684 calibration tokens; WikiText-2 perplexity on its first 4,096 tokens, window 512;
# dense 30.6):
#   activation, MLP channels only, no refit      89.6   <- default
#   activation, MLP only, least-squares refit   118.0
#   activation, KV groups + MLP, no refit       156.7
#   activation, KV groups + MLP, refit          288.1
#   taylor, KV groups + MLP, refit              565.3
#   magnitude, KV groups + MLP, refit        34,501
# Removing a whole KV group (a third of SmolLM2's attention) in every layer, the sensitive first
# and last included, costs more than taking the same parameters from the MLP; the refit fits the
# few calibration tokens too closely and generalises worse (more data may change that).
DEFAULT_STRUCTURED_IMPORTANCE = "activation"
REPORT_NAME = "pruning_report.json"



# ----------------------------------------------------------------------------- model access


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a decoder layer, by its name within the layer."""
    return {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class _StopForward(Exception):
    """Raised by the capture hook so that nothing after layer 0 runs."""


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, id_batches: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
    """The hidden states and keyword arguments (RoPE, masks, positions) that enter decoder layer 0."""
    layers = decoder_layers(model)
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = model.get_input_embeddings().weight.device
    try:
        for ids in id_batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def _run_layer(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    out = []
    for hidden, kwargs in inputs:
        h = layer(hidden, **kwargs)
        out.append((h[0] if isinstance(h, (tuple, list)) else h, kwargs))
    return out


class _InputStats:
    """Forward hooks that accumulate statistics of the inputs of some linears (float32)."""

    def __init__(self, modules: dict[str, nn.Linear], kind: str):
        self.kind = kind  # "sq_norms" (Wanda, activation importance) or "hessian" (SparseGPT)
        self.stats: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def fn(module, args, output):
            x = args[0]
            if self.kind == "sq_norms":
                self.stats[name] = update_column_sq_norms(self.stats.get(name), x)
            else:
                self.stats[name], self.counts[name] = update_hessian(self.stats.get(name), self.counts.get(name, 0), x)

        return fn

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _param_counts(model: nn.Module) -> dict[str, int]:
    """Stored and non-zero parameter counts, whole model and decoder blocks (tied weights counted once)."""
    in_blocks = {id(p) for p in decoder_layers(model).parameters()}
    c = {"total": 0, "total_nonzero": 0, "blocks": 0, "blocks_nonzero": 0}
    for p in model.parameters():  # parameters() yields a tied tensor once
        n, nz = p.numel(), int(torch.count_nonzero(p))
        c["total"] += n
        c["total_nonzero"] += nz
        if id(p) in in_blocks:
            c["blocks"] += n
            c["blocks_nonzero"] += nz
    return c


def _new_linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = old.weight
    if rows is not None:
        w = slice_rows(w, rows)
    if cols is not None:
        w = slice_cols(w, cols)
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if old.bias is not None:
            new.bias.copy_(slice_rows(old.bias.unsqueeze(1), rows).squeeze(1) if rows is not None else old.bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    return new


# ----------------------------------------------------------------------------- structured surgery


def _prune_layer_structured(
    layer: nn.Module, keep_groups: torch.Tensor, keep_channels: torch.Tensor, n_rep: int, head_dim: int
) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    q_rows = query_rows_of_groups(keep_groups, n_rep, head_dim)
    kv_rows = kv_rows_of_heads(keep_groups, head_dim)
    attn.q_proj = _new_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = _new_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = _new_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = _new_linear(attn.o_proj, cols=q_rows)
    mlp.gate_proj = _new_linear(mlp.gate_proj, rows=keep_channels)
    mlp.up_proj = _new_linear(mlp.up_proj, rows=keep_channels)
    mlp.down_proj = _new_linear(mlp.down_proj, cols=keep_channels)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(keep_channels.numel())
    for attr, value in (("num_heads", keep_groups.numel() * n_rep), ("num_key_value_heads", keep_groups.numel())):
        if hasattr(attn, attr):
            setattr(attn, attr, int(value))


def _rewrite_config(model: nn.Module, plan: StructuredPlan, n_rep: int, head_dim: int) -> dict:
    """Make the config describe the new shapes, so that `from_pretrained` builds matching modules."""
    cfg = model.config
    before = {k: getattr(cfg, k, None) for k in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")}
    cfg.intermediate_size = plan.channels_keep
    cfg.num_attention_heads = plan.kv_groups_keep * n_rep
    cfg.num_key_value_heads = plan.kv_groups_keep
    cfg.head_dim = head_dim  # explicit: hidden // heads no longer equals the head size
    after = {k: getattr(cfg, k) for k in before}
    return {"before": before, "after": after}


def _taylor_grads(model: nn.Module, id_batches: Sequence[torch.Tensor], show_progress: bool) -> dict[int, dict[str, torch.Tensor]]:
    """dL/dW of every decoder linear, summed over the calibration sequences (LLM-Pruner's first-order term)."""
    layers = decoder_layers(model)
    wanted = {id(m.weight) for layer in layers for m in layer_linears(layer).values()}
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    device = model.get_input_embeddings().weight.device
    try:
        with torch.enable_grad():
            for ids in tqdm(id_batches, desc="taylor gradients", disable=not show_progress):
                ids = ids.to(device)
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads = {
            i: {name: m.weight.grad.detach().float() for name, m in layer_linears(layer).items()}
            for i, layer in enumerate(layers)
        }
    finally:
        for p, req in saved.items():
            p.grad = None
            p.requires_grad_(req)
    return grads


# ----------------------------------------------------------------------------- the driver


def _check_args(method: str, sparsity: float, pattern: str | None, importance: str) -> tuple[tuple[int, int] | None, str | None]:
    if method not in METHODS:
        raise PaserError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    try:
        nm = parse_pattern(pattern)
    except ValueError as e:
        raise PaserError(str(e)) from None
    if nm is not None and method == "structured":
        raise PaserError("an N:M pattern applies to unstructured methods (magnitude, wanda, sparsegpt), not structured")
    if nm is None and not 0.0 < sparsity < 1.0:
        raise PaserError(f"sparsity must be a fraction in (0, 1), got {sparsity}")
    if method == "structured":
        imp = DEFAULT_STRUCTURED_IMPORTANCE if importance in (None, "auto") else importance
        if imp not in IMPORTANCES:
            raise PaserError(f"unknown importance {importance!r} for structured pruning; choose one of {', '.join(IMPORTANCES)}")
        return nm, imp
    if importance not in (None, "auto", method):
        raise PaserError(f"importance {importance!r} only applies to structured pruning ({method} has its own score)")
    return nm, None


def _layer_range(n_layers: int, layers: tuple[int, int] | None, method: str) -> range:
    if layers is None:
        return range(n_layers)
    start, stop = layers
    start, stop = max(0, start), min(n_layers, stop)
    if start >= stop:
        raise PaserError(f"layer range {layers} selects no layer of {n_layers}")
    if method == "structured" and (start, stop) != (0, n_layers):
        raise PaserError(
            "structured pruning prunes every decoder layer to the same shape: a LLaMA config has one global "
            "intermediate_size and head count, so a model with unpruned layers could not be loaded by from_pretrained"
        )
    return range(start, stop)


def _perplexity(model, tokenizer, tokens: int, window: int, show_progress: bool) -> dict:
    from paser.score.perplexity import corpus_perplexity

    return _strict_perplexity(corpus_perplexity(model, tokenizer, "wikitext2", window=window, max_tokens=tokens, show_progress=show_progress).to_dict())


def _strict_perplexity(d: dict) -> dict:
    """The report's perplexity entry as strict JSON: a value that is not a finite number
    becomes null, with the reason under "notes" (one window has no standard error; a mean NLL
    beyond ~709 nats overflows exp())."""
    notes = {}
    for key in ("ppl", "nll", "nll_stderr"):
        v = d.get(key)
        if isinstance(v, float) and not math.isfinite(v):
            if key == "nll_stderr" and d.get("n_windows", 0) < 2:
                notes[key] = "one window: no standard error (use more perplexity tokens)"
            elif key == "ppl":
                notes[key] = f"overflow: exp of the mean NLL ({d.get('nll')}) is not a finite number"
            else:
                notes[key] = f"not a finite number ({v})"
            d[key] = None
    d["window_nll"] = [x if isinstance(x, float) and math.isfinite(x) else None for x in d.get("window_nll", [])]
    if notes:
        d["notes"] = notes
    return d


def prune_model(
    model: nn.Module,
    tokenizer,
    method: str,
    sparsity: float,
    pattern: str | None = None,
    calibration: str | Path | Sequence[str] | None = None,
    n_calibration: int = 32,
    seq_len: int = 256,
    importance: str = "auto",
    show_progress: bool = True,
    *,
    layers: tuple[int, int] | None = None,
    prune_heads: bool = False,
    reconstruct: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
    seed: int | None = None,
    ppl_tokens: int = 0,
    ppl_window: int = 512,
) -> dict:
    """Prune `model` in place and return the report (JSON-able dict).

    method: magnitude | wanda | sparsegpt | structured. sparsity: the share of weights to zero
    in each pruned linear (unstructured), or the share of decoder-block parameters to remove
    (structured). pattern: "N:M" (N kept of every M consecutive input weights; overrides
    sparsity). calibration: None (the embedded pool), a record or text file, or a list of
    strings; `n_calibration` of them, each cut to `seq_len` tokens. importance: structured only,
    "activation" (default), "taylor" or "magnitude"; prune_heads also removes whole KV groups
    (with their query heads), reconstruct refits o_proj/down_proj by least squares on the kept
    channels (both off by default: measured worse on SmolLM2, see above). layers: (start, stop) of
    the decoder layers to prune (unstructured methods only; structured must prune all).
    ppl_tokens > 0 measures WikiText-2 perplexity on that many tokens before and after.
    """
    nm, imp = _check_args(method, sparsity, pattern, importance)
    target = pattern_sparsity(nm) if nm is not None else float(sparsity)
    if nm is not None and sparsity and abs(float(sparsity) - target) > 1e-6:
        log.warning("pattern %s:%s fixes the sparsity at %.3f; the requested %.3f is ignored", nm[0], nm[1], target, sparsity)
    all_layers = decoder_layers(model)
    selected = _layer_range(len(all_layers), layers, method)
    was_training = model.training
    model.eval()
    if nm is not None:
        for i in selected:
            for name, lin in layer_linears(all_layers[i]).items():
                if lin.in_features % nm[1]:
                    raise PaserError(f"pattern {pattern}: layer {i} {name} has {lin.in_features} inputs, not a multiple of {nm[1]}")
    report: dict[str, Any] = {
        "method": method,
        "sparsity": target,
        "requested_sparsity": float(sparsity),
        "pattern": f"{nm[0]}:{nm[1]}" if nm else None,
        "importance": imp if method == "structured" else method,
        "layers": [selected.start, selected.stop],
    }
    if ppl_tokens:
        if ppl_tokens < ppl_window:
            raise PaserError(f"ppl_tokens ({ppl_tokens}) must be at least the perplexity window ({ppl_window})")
        report["perplexity"] = {"before": _perplexity(model, tokenizer, ppl_tokens, ppl_window, show_progress)}
    params_before = _param_counts(model)

    needs_calibration = PRUNING_METHODS[method].stats is not None or (method == "structured" and (imp != "magnitude" or reconstruct))
    t0 = time.time()
    id_batches: list[torch.Tensor] = []
    if needs_calibration:
        calib: Calibration = load_calibration(calibration, n_calibration, seed)
        id_batches = tokenize_calibration(calib.texts, tokenizer, seq_len)
        report["calibration"] = {
            **calib.describe(),
            "count": len(id_batches),
            "seq_len": seq_len,
            "tokens": int(sum(t.numel() for t in id_batches)),
        }
    else:
        report["calibration"] = None

    per_layer: dict[str, dict] = {}
    if method == "structured":
        per_layer, extra = _prune_structured(model, imp, target, prune_heads, reconstruct, id_batches, percdamp, show_progress)
        report["structured"] = extra
    else:
        per_layer = _prune_unstructured(model, method, target, nm, selected, id_batches, blocksize, percdamp, show_progress)
    report["seconds"] = round(time.time() - t0, 2)

    params_after = _param_counts(model)
    report["params"] = {
        "total_before": params_before["total"],
        "total_after": params_after["total"],
        "total_nonzero_after": params_after["total_nonzero"],
        "blocks_before": params_before["blocks"],
        "blocks_after": params_after["blocks"],
        "blocks_nonzero_after": params_after["blocks_nonzero"],
        "blocks_reduction": 1.0 - params_after["blocks_nonzero"] / params_before["blocks_nonzero"],
    }
    pruned = [v for v in per_layer.values() if "sparsity" in v]
    if pruned:
        zeros = sum(v["sparsity"] * v["numel"] for v in pruned)
        report["achieved_sparsity"] = zeros / sum(v["numel"] for v in pruned)
    else:
        report["achieved_sparsity"] = report["params"]["blocks_reduction"]
    report["per_layer"] = per_layer
    report["device"] = str(_device_of(model))
    report["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    if ppl_tokens:
        report["perplexity"]["after"] = _perplexity(model, tokenizer, ppl_tokens, ppl_window, show_progress)
    model.train(was_training)
    return report


def _prune_unstructured(
    model: nn.Module,
    method: str,
    sparsity: float,
    nm: tuple[int, int] | None,
    selected: range,
    id_batches: list[torch.Tensor],
    blocksize: int,
    percdamp: float,
    show_progress: bool,
) -> dict[str, dict]:
    layers = decoder_layers(model)
    prefix = layers_prefix(model)
    entry = PRUNING_METHODS[method]
    calibrated = entry.stats is not None
    opts = {"blocksize": blocksize, "percdamp": percdamp}
    per_layer: dict[str, dict] = {}
    inputs = capture_layer_inputs(model, id_batches) if calibrated else []
    last = selected.stop - 1
    for i in tqdm(range(selected.stop), desc=f"{method} pruning", unit="layer", disable=not show_progress):
        layer = layers[i]
        if i not in selected:
            if calibrated:
                inputs = _run_layer(layer, inputs)
            continue
        linears = layer_linears(layer)
        stats: _InputStats | None = None
        if calibrated:
            stats = _InputStats(linears, entry.stats)
            try:
                _run_layer(layer, inputs)
            finally:
                stats.remove()
        for name, lin in linears.items():
            w = lin.weight
            with torch.no_grad():
                w.copy_(entry.prune(w, stats.stats[name] if stats else None, sparsity, nm, opts))
            per_layer[f"{prefix}{i}.{name}"] = {"shape": list(w.shape), "numel": w.numel(), "sparsity": zero_fraction(w)}
        del stats
        if calibrated and i != last:
            inputs = _run_layer(layer, inputs)  # the pruned layer feeds the next one
    return per_layer


def _prune_structured(
    model: nn.Module,
    importance: str,
    sparsity: float,
    prune_heads: bool,
    reconstruct: bool,
    id_batches: list[torch.Tensor],
    percdamp: float,
    show_progress: bool,
) -> tuple[dict[str, dict], dict]:
    hidden, n_heads, n_kv, head_dim, inter = structured_shapes(model)
    n_rep = n_heads // n_kv
    cfg = model.config
    plan = plan_structured(
        hidden, n_heads, n_kv, head_dim, inter, sparsity, prune_heads,
        attention_bias=bool(getattr(cfg, "attention_bias", False)), mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
    )
    layers = decoder_layers(model)
    prefix = layers_prefix(model)
    grads = _taylor_grads(model, id_batches, show_progress) if importance == "taylor" else None
    use_stats = importance == "activation" or reconstruct
    inputs = capture_layer_inputs(model, id_batches) if use_stats else []
    per_layer: dict[str, dict] = {}
    for i in tqdm(range(len(layers)), desc="structured pruning", unit="layer", disable=not show_progress):
        layer = layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        o_sq = down_sq = h_o = h_down = None
        if use_stats:
            # Hessians of the output projections' inputs: their diagonals are the squared
            # activation norms (up to a common scale) and the whole matrices drive the refit.
            stats = _InputStats({"o_proj": attn.o_proj, "down_proj": mlp.down_proj}, "hessian")
            try:
                _run_layer(layer, inputs)
            finally:
                stats.remove()
            h_o, h_down = stats.stats["o_proj"], stats.stats["down_proj"]
            o_sq, down_sq = torch.diag(h_o), torch.diag(h_down)
        g = grads[i] if grads is not None else None
        ch_scores = mlp_channel_importance(
            mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, importance,
            down_in_sq_norms=down_sq,
            grads=(g["mlp.gate_proj"], g["mlp.up_proj"], g["mlp.down_proj"]) if g else None,
        )
        grp_scores = head_group_importance(
            attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight, n_kv, head_dim, importance,
            o_in_sq_norms=o_sq,
            grads=tuple(g[f"self_attn.{n}"] for n in ATTENTION_PROJECTIONS) if g else None,
        )
        keep_ch = keep_top(ch_scores, plan.channels_keep)
        keep_gr = keep_top(grp_scores, plan.kv_groups_keep)
        before = {name: lin.weight.numel() for name, lin in layer_linears(layer).items()}
        o_new = down_new = None
        if reconstruct:
            o_new = reconstruct_kept_columns(attn.o_proj.weight, h_o, query_rows_of_groups(keep_gr, n_rep, head_dim), percdamp)
            down_new = reconstruct_kept_columns(mlp.down_proj.weight, h_down, keep_ch, percdamp)
        _prune_layer_structured(layer, keep_gr, keep_ch, n_rep, head_dim)
        with torch.no_grad():
            if o_new is not None:
                layer.self_attn.o_proj.weight.copy_(o_new.to(layer.self_attn.o_proj.weight.dtype))
            if down_new is not None:
                layer.mlp.down_proj.weight.copy_(down_new.to(layer.mlp.down_proj.weight.dtype))
        for name, lin in layer_linears(layer).items():
            per_layer[f"{prefix}{i}.{name}"] = {
                "shape": list(lin.weight.shape),
                "numel": lin.weight.numel(),
                "removed": 1.0 - lin.weight.numel() / before[name],
            }
        per_layer[f"{prefix}{i}"] = {
            "kv_groups_kept": keep_gr.tolist(),
            "channels_kept": int(keep_ch.numel()),
        }
        if use_stats and i != len(layers) - 1:
            inputs = _run_layer(layer, inputs)
    if grads is not None:
        del grads
    config_change = _rewrite_config(model, plan, n_rep, head_dim)
    extra = {
        "importance": importance,
        "prune_heads": prune_heads,
        "reconstruct": reconstruct,
        "kv_groups_keep": plan.kv_groups_keep,
        "kv_groups": plan.kv_groups,
        "heads_keep": plan.kv_groups_keep * n_rep,
        "channels_keep": plan.channels_keep,
        "channels": plan.channels,
        "block_params_before": plan.params_per_layer_before * len(layers),
        "block_params_after": plan.params_per_layer_after * len(layers),
        "block_sparsity": plan.block_sparsity,
        "config": config_change,
        "why_uniform": "every layer pruned to the same shape: a LLaMA config has one global intermediate_size and head count",
    }
    return per_layer, extra


# ----------------------------------------------------------------------------- files


def save_pruned(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict) -> Path:
    """Write a directory that `AutoModelForCausalLM.from_pretrained` loads, plus pruning_report.json.

    Written to a temporary sibling first and renamed, so a crash never leaves half a model.
    An existing non-empty directory is replaced only if it holds a model (config.json) or a
    previous pruning report; anything else is refused rather than deleted.
    """
    from paser.io.cache import atomic_write_dir, atomic_write_json

    out = Path(out_dir).expanduser()
    if out.exists():
        if not out.is_dir():
            raise PaserError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not ((out / "config.json").exists() or (out / REPORT_NAME).exists()):
            raise PaserError(f"{out}: directory is not empty and holds no model; choose another --out")

    def write(d: Path) -> None:
        model.save_pretrained(d, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(d)
        atomic_write_json(d / REPORT_NAME, report)

    atomic_write_dir(out, write)
    return out


def run_prune(
    model_spec: str,
    method: str,
    sparsity: float,
    pattern: str | None = None,
    out_dir: str | os.PathLike | None = None,
    calibration: str | Path | Sequence[str] | None = None,
    n_calibration: int = 32,
    seq_len: int = 256,
    importance: str = "auto",
    ppl_tokens: int = 4096,
    ppl_window: int = 512,
    *,
    layers: tuple[int, int] | None = None,
    prune_heads: bool = False,
    reconstruct: bool = False,
    seed: int | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    show_progress: bool = True,
) -> dict:
    """Load a model (`paser.io.models.load_model`), prune it, measure perplexity, save it; return the report.

    ppl_tokens=0 skips the perplexity measurements; out_dir=None skips saving.
    """
    from paser.config import check_output_path
    from paser.io.models import load_model

    if out_dir is not None:  # refused now, not after the whole prune
        check_output_path(out_dir, "whole-dir", [model_spec, calibration if isinstance(calibration, (str, os.PathLike)) else None])
    lm = load_model(model_spec, device=device, dtype=dtype, allow_pickle=allow_pickle)
    report = prune_model(
        lm.model, lm.tokenizer, method, sparsity, pattern, calibration, n_calibration, seq_len, importance, show_progress,
        layers=layers, prune_heads=prune_heads, reconstruct=reconstruct, seed=seed, ppl_tokens=ppl_tokens, ppl_window=ppl_window,
    )
    report = {"model": {"spec": model_spec, "name": lm.name, "fingerprint": lm.fingerprint}, **report}
    if out_dir is not None:
        report["out_dir"] = str(Path(out_dir).expanduser())
        save_pruned(lm.model, lm.tokenizer, out_dir, report)
    return report
