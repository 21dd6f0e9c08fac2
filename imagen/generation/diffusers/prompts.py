"""Prompt handling: LoRA trigger words, and Compel encoding for SDXL's two text encoders.

Compel gives prompts of any length (77-token chunks, nothing truncated) and weighting syntax
(``(word)1.3``, ``word++``, ``word--``) on both the positive and the negative prompt.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyparsing
import torch
from compel import Compel, CompelForSDXL


def add_trigger_words(prompt: str, trigger_words: Iterable[str]) -> str:
    """Put each trigger word in front of the prompt unless it is already there (whole words, any case)."""
    missing: list[str] = []
    for word in trigger_words:
        word = word.strip()
        if not word:
            continue
        pattern = r"(?<!\w)" + re.escape(word) + r"(?!\w)"
        if re.search(pattern, prompt, flags=re.IGNORECASE) is None and all(
            w.lower() != word.lower() for w in missing
        ):
            missing.append(word)
    if not missing:
        return prompt
    return ", ".join([*missing, prompt]) if prompt.strip() else ", ".join(missing)


@dataclass
class PromptEmbeddings:
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor


class PromptEncoder:
    """Compel over a pipeline's two tokenizers / text encoders (penultimate hidden states, pooled from #2)."""

    def __init__(self, pipe: Any, device: torch.device, dtype: torch.dtype) -> None:
        # CompelForSDXL = one Compel per encoder, both with PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED and
        # truncate_long_prompts=False, pooled embeddings from the second, positive and negative padded to the
        # same number of 77-token chunks. (Compel's list-of-encoders form is deprecated in 2.x and fails to
        # pad prompts of different lengths.)
        self._compel = CompelForSDXL(pipe, device=str(device))
        self._dtype = dtype
        # Compel parses every prompt with pyparsing, once per text encoder: 10-15 ms of Python per parse,
        # four per job, more than the tiny demo model's whole text encoding. Parse each text once for both
        # encoders and keep recent parses (the negative prompt is often the same default for every job);
        # packrat memoising makes each parse faster. Parsing is pure: the embeddings are the same.
        pyparsing.ParserElement.enable_packrat()
        parse = functools.lru_cache(maxsize=64)(Compel.parse_prompt_string)
        for compel in (self._compel.compel_1, self._compel.compel_2):
            setattr(compel, "parse_prompt_string", parse)  # noqa: B010 - shadows the classmethod

    @torch.no_grad()
    def encode(self, prompt: str, negative_prompt: str) -> PromptEmbeddings:
        out = self._compel(prompt, negative_prompt=negative_prompt)
        return PromptEmbeddings(
            prompt_embeds=out.embeds.to(self._dtype),
            pooled_prompt_embeds=out.pooled_embeds.to(self._dtype),
            negative_prompt_embeds=out.negative_embeds.to(self._dtype),
            negative_pooled_prompt_embeds=out.negative_pooled_embeds.to(self._dtype),
        )


def trigger_words_for(choices: Sequence[tuple[str, float]], words: dict[str, list[str] | None]) -> list[str]:
    """Trigger words of the LoRAs that are actually applied (weight ≠ 0), in request order."""
    out: list[str] = []
    for name, weight in choices:
        if weight != 0:
            out.extend(words.get(name) or [])
    return out
