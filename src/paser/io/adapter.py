"""Model-family knowledge in one place (in the spirit of SliceGPT's ModelAdapter): where a causal
LM keeps its text decoder, its decoder layers and its LM head, and which token pads a batch.

Every stage asks here instead of guessing on its own: pruning (the layers, and for structured
pruning the projections it cuts and their shapes), scoring and
evaluation (decoder + head, the pad id), recovery (the LoRA targets' prefix). A model these
rules do not fit gets one clear error naming its class.
"""

from __future__ import annotations

from torch import nn

from paser.errors import ModelError


def unwrap(model: nn.Module) -> nn.Module:
    """The causal LM inside a peft PeftModel (adapters stay active); the model itself otherwise."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder(model: nn.Module) -> nn.Module:
    """The text decoder (the module whose output is the final hidden states): `get_decoder()`,
    which LLaMA, Gemma-3, Qwen2 and Mistral all implement, else the base-model attribute."""
    base = unwrap(model)
    try:
        dec = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, base.base_model_prefix, None)
    except Exception:  # noqa: BLE001 - exotic models raise from get_decoder
        dec = None
    if dec is None or dec is base:
        raise ModelError(f"{type(base).__name__}: cannot find its text decoder (paser supports decoder-only causal LMs)")
    return dec


def module_path(model: nn.Module, module: nn.Module) -> str:
    """The dotted name of `module` inside `model` ("" when it is the model itself or absent)."""
    for name, mod in model.named_modules():
        if mod is module:
            return name
    return ""


def decoder_prefix(model: nn.Module) -> str:
    """Module path of the text decoder ("model" for LLaMA/Gemma causal LMs; "" if none found).

    A multimodal checkpoint (Gemma-3 4B+) also has a vision tower whose layers carry the same
    projection names; only the text decoder's belong to the language model."""
    try:
        return module_path(model, decoder(model))
    except ModelError:
        return ""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (LLaMA, Mistral, Qwen, Gemma all expose `<decoder>.layers`)."""
    try:
        layers = getattr(decoder(model), "layers", None)
    except ModelError:
        layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ModelError(f"cannot find the decoder layers of {type(model).__name__}: paser supports decoder-only LMs with `model.layers`")
    return layers


def layers_prefix(model: nn.Module) -> str:
    """"<path of the decoder layers>." (e.g. "model.layers.") for naming per-layer modules."""
    path = module_path(model, decoder_layers(model))
    return path + "." if path else "layers."


def lm_head(model: nn.Module) -> nn.Module | None:
    base = unwrap(model)
    return base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None


def pad_id(tokenizer, *, strict: bool = False, name: str = "the model") -> int:
    """The token that pads a batch: the tokenizer's pad token, else its EOS. Right padding
    with causal attention means no real position ever attends to it, so any id works where
    neither exists (0), unless `strict` (training, where labels are built from it)."""
    for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if t is not None:
            return int(t)
    if strict:
        raise ModelError(f"{name}: the tokenizer has neither a pad nor an EOS token")
    return 0


# Structured pruning removes whole KV groups and MLP channels, so it needs to know which
# projections read and write them; unstructured methods only need `nn.Linear`s.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def structured_shapes(model: nn.Module) -> tuple[int, int, int, int, int]:
    """(hidden, query heads, KV heads, head dim, MLP channels) for structured pruning, after
    checking that every decoder layer has the LLaMA-style projections (`ATTENTION_PROJECTIONS`
    under `self_attn`, `MLP_PROJECTIONS` under `mlp`: LLaMA, Mistral, Qwen2, Gemma) at the
    config's sizes; any other layout gets one clear error."""
    cfg = model.config
    hidden, n_heads, n_kv, inter = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ATTENTION_PROJECTIONS) or not all(
            isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP_PROJECTIONS
        ):
            raise ModelError(
                f"structured pruning needs LLaMA-style layers (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj); layer {i} of "
                f"{type(model).__name__} is not"
            )
        if attn.k_proj.weight.shape[0] != n_kv * head_dim or mlp.gate_proj.weight.shape[0] != inter:
            raise ModelError(f"layer {i} does not match the config's sizes: is this model already pruned non-uniformly?")
    return hidden, n_heads, n_kv, head_dim, inter
