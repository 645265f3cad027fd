"""Batched greedy generation for evaluation: prompts, left padding, EOS, decoded completions.

``build_prompts(tokenizer, questions)`` renders each question with the tokenizer's chat template
(``add_generation_prompt=True``) when it has one, else as ``hwnoise.data.prompt_text``.
``generate_greedy(model, tokenizer, prompts, max_new_tokens)`` runs one batch: the prompts are
padded on the left (a causal model continues from the last position, so every prompt must end
there), the attention mask hides the padding, and decoding is greedy until EOS or the token limit.
The tokenizer is not changed: the padding is done here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import prompt_messages, prompt_text
from ..devices import input_device

__all__ = ["Completion", "Prompt", "build_prompts", "eos_token_ids", "generate_greedy", "pad_token_id"]


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt: its text (as recorded) and its token ids (as fed to the model)."""

    text: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Completion:
    """A decoded completion (special tokens skipped) and how many tokens were generated (EOS included)."""

    text: str
    generated_tokens: int


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompts(tokenizer, questions) -> list[Prompt]:
    """Render and tokenize questions: chat template when the tokenizer has one, else ``prompt_text``."""
    out = []
    chat = uses_chat_template(tokenizer)
    for question in questions:
        if chat:
            text = tokenizer.apply_chat_template(prompt_messages(question), tokenize=False, add_generation_prompt=True)
            # The template already holds the special tokens it wants (BOS, role markers).
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            text = prompt_text(question)
            ids = tokenizer(text)["input_ids"]
        if not ids:
            raise ValueError(f"question {question!r} tokenizes to no tokens")
        out.append(Prompt(text=text, ids=tuple(int(i) for i in ids)))
    return out


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a completion: the generation config's EOS ids and the tokenizer's."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer names an EOS token")
    return ids


def pad_token_id(tokenizer, eos: list[int]) -> int:
    """The tokenizer's pad id, or the first EOS id when it has none (padding is masked anyway)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else eos[0]


def generate_greedy(model, tokenizer, prompts: list[Prompt], max_new_tokens: int) -> list[Completion]:
    """Greedy completions of one batch of prompts (left-padded), each stopped at its first EOS."""
    from transformers import GenerationConfig

    if not prompts:
        return []
    eos = eos_token_ids(model, tokenizer)
    pad = pad_token_id(tokenizer, eos)
    width = max(len(p.ids) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p.ids):] = torch.tensor(p.ids, dtype=torch.long)
        attention_mask[row, width - len(p.ids):] = 1
    device = input_device(model)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                              pad_token_id=pad)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=config)
    new = out[:, width:].tolist()
    completions = []
    eos_set = set(eos)
    for tokens in new:
        end = next((i + 1 for i, t in enumerate(tokens) if t in eos_set), len(tokens))
        tokens = tokens[:end]
        completions.append(Completion(text=tokenizer.decode(tokens, skip_special_tokens=True), generated_tokens=end))
    return completions
