"""The one prompt template that scoring (JSD, IFD) and recovery training share.

PASER measures capability degradation on the response tokens given the prompt, and recovery
trains on exactly those tokens. Both must see the same token sequence, so both call
`encode_example` here and nothing else builds prompts.
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


def render_prompt(record: "Record", template: str = "alpaca", tokenizer=None) -> str:
    """The prompt text x that precedes the response y."""
    if template == "alpaca":
        if record.input.strip():
            return _ALPACA_WITH_INPUT.format(instruction=record.instruction, input=record.input)
        return _ALPACA_NO_INPUT.format(instruction=record.instruction)
    if template == "plain":
        text = record.instruction if not record.input.strip() else f"{record.instruction}\n\n{record.input}"
        return text + "\n\n"
    if template == "raw":
        # The instruction already holds the whole prompt (used for Nuggets' one-shot prompts).
        return record.instruction
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat template; use 'alpaca'")
        user = record.instruction if not record.input.strip() else f"{record.instruction}\n\n{record.input}"
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


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
    p_ids = list(tokenizer(prompt, add_special_tokens=template != "chat")["input_ids"])
    r_ids = list(tokenizer(record.output, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        r_ids.append(int(tokenizer.eos_token_id))
    if len(p_ids) + len(r_ids) > cutoff:
        keep_prompt = max(1, min(len(p_ids), cutoff - min(len(r_ids), min_response_tokens)))
        if keep_prompt < len(p_ids):
            head = p_ids[:1] if tokenizer.bos_token_id is not None and p_ids[0] == tokenizer.bos_token_id else []
            p_ids = head + p_ids[len(p_ids) - keep_prompt + len(head) :]
        r_ids = r_ids[: cutoff - len(p_ids)]
    return EncodedExample(input_ids=p_ids + r_ids, n_prompt=len(p_ids))
