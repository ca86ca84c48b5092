"""The one prompt template that scoring (JSD, IFD) and recovery training share.

PASER measures capability degradation on the response tokens given the prompt, and recovery
trains on exactly those tokens. Both must see the same token sequence, so both call
`encode_example` here and nothing else builds prompts.

A conversation record (ShareGPT / messages) is built with the tokenizer's chat template when
it has one, whatever `template` names, with its system prompt in the system role; `template`
is then only the fallback for a tokenizer without a chat template. Instruction (Alpaca-style)
records use `template` as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from paser.io.records import Record

TEMPLATES = ("alpaca", "chat", "plain", "raw")

# The Stanford Alpaca prompt, as LLM-Pruner's and PASER's reference training code use it.
_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant", "bot": "assistant", "system": "system"}


def normalise_turns(turns: list) -> list[dict]:
    """ShareGPT (from/value) or OpenAI (role/content) turns as OpenAI role/content turns."""
    out = []
    for t in turns:
        role = str(t.get("from", t.get("role", ""))).lower()
        out.append({"role": _ROLES.get(role, role), "content": t.get("value", t.get("content"))})
    return out


def _user_text(record: "Record") -> str:
    return record.instruction if not record.input.strip() else f"{record.instruction}\n\n{record.input}"


def chat_messages(record: "Record", with_reply: bool = False) -> list[dict]:
    """The record's first exchange as chat turns: system (if any), user, and the reply if asked."""
    msgs = [{"role": "system", "content": record.system}] if record.system else []
    msgs.append({"role": "user", "content": _user_text(record)})
    if with_reply:
        msgs.append({"role": "assistant", "content": record.output})
    return msgs


def has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(record: "Record", template: str, tokenizer) -> bool:
    """Conversations take the tokenizer's chat template when it has one; other records only
    with template 'chat'."""
    return template == "chat" or (getattr(record, "chat", False) and has_chat_template(tokenizer))


def render_prompt(record: "Record", template: str = "alpaca", tokenizer=None) -> str:
    """The prompt text x that precedes the response y."""
    system = getattr(record, "system", "")
    if uses_chat_template(record, template, tokenizer):
        if not has_chat_template(tokenizer):
            raise ValueError("template 'chat' needs a tokenizer with a chat template; use 'alpaca'")
        return tokenizer.apply_chat_template(chat_messages(record), tokenize=False, add_generation_prompt=True)
    if template == "alpaca":
        if system.strip():
            # A conversation's system prompt takes the place of Alpaca's own preamble (which is
            # a system prompt too), never the "### Input:" slot.
            return f"{system}\n\n### Instruction:\n{record.instruction}\n\n### Response:\n"
        if record.input.strip():
            return _ALPACA_WITH_INPUT.format(instruction=record.instruction, input=record.input)
        return _ALPACA_NO_INPUT.format(instruction=record.instruction)
    if template == "plain":
        text = _user_text(record)
        return (f"{system}\n\n{text}" if system.strip() else text) + "\n\n"
    if template == "raw":
        # The instruction already holds the whole prompt (used for Nuggets' one-shot prompts).
        return record.instruction
    raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def _chat_response_text(record: "Record", prompt: str, tokenizer) -> str | None:
    """The reply as the chat template renders it after `prompt` (its end-of-turn marker
    included), or None when the template does not render the prompt as a prefix of the
    whole exchange (some templates rewrite earlier turns); then the plain output is used."""
    full = tokenizer.apply_chat_template(chat_messages(record, with_reply=True), tokenize=False)
    if not full.startswith(prompt) or record.output not in full[len(prompt) :]:
        return None
    return full[len(prompt) :]


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of prompt + response; the response starts at `n_prompt`."""

    input_ids: list[int]
    n_prompt: int

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.n_prompt

    def labels(self, ignore_index: int = -100) -> list[int]:
        """Causal-LM labels with the prompt masked out: loss on the response tokens only."""
        return [ignore_index] * self.n_prompt + self.input_ids[self.n_prompt :]


def encode_example(
    record: "Record",
    tokenizer,
    template: str = "alpaca",
    cutoff: int = 256,
    min_response_tokens: int = 16,
) -> EncodedExample:
    """Tokenise prompt and response separately (a clean boundary), then fit both into `cutoff`.

    The response ends with EOS so that the model learns to stop. When the pair is too long the
    prompt keeps its end (which holds the "### Response:" cue) and the response keeps its start.
    """
    prompt = render_prompt(record, template, tokenizer)
    chat = uses_chat_template(record, template, tokenizer)
    # A chat template writes its own special tokens (BOS included) into the text.
    p_ids = list(tokenizer(prompt, add_special_tokens=not chat)["input_ids"])
    rendered = None
    if chat and getattr(record, "chat", False):
        # A conversation trains on the reply as its chat template ends it (e.g. <|im_end|>).
        rendered = _chat_response_text(record, prompt, tokenizer)
    r_ids = list(tokenizer(rendered if rendered is not None else record.output, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and rendered is not None and int(eos) in r_ids:
        # The template's end of turn is EOS: the reply ends there (not on the newline after it).
        r_ids = r_ids[: len(r_ids) - r_ids[::-1].index(int(eos))]
    elif eos is not None:
        r_ids.append(int(eos))
    if len(p_ids) + len(r_ids) > cutoff:
        keep_prompt = max(1, min(len(p_ids), cutoff - min(len(r_ids), min_response_tokens)))
        if keep_prompt < len(p_ids):
            head = p_ids[:1] if tokenizer.bos_token_id is not None and p_ids[0] == tokenizer.bos_token_id else []
            p_ids = head + p_ids[len(p_ids) - keep_prompt + len(head) :]
        r_ids = r_ids[: cutoff - len(p_ids)]
    return EncodedExample(input_ids=p_ids + r_ids, n_prompt=len(p_ids))
