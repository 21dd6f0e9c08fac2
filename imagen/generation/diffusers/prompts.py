"""Prompt handling: LoRA trigger words, and Compel encoding for SDXL's two text encoders.

Compel gives prompts of any length (77-token chunks, nothing truncated) and weighting syntax
(``(word)1.3``, ``word++``, ``word--``) on both the positive and the negative prompt.
"""

from __future__ import annotations

import functools
import re
import types
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


class _SkipLayers:
    """A text encoder whose ``hidden_states`` lose their last ``count`` layers: Compel's "penultimate"
    then reads ``count`` layers further back (the pooled output, from the final layer, is unchanged)."""

    def __init__(self, encoder: Any, count: int) -> None:
        self._encoder = encoder
        self._count = count

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output = self._encoder(*args, **kwargs)
        hidden_states = getattr(output, "hidden_states", None)
        if hidden_states is not None:
            output.hidden_states = hidden_states[: -self._count]
        return output

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)


class PromptEncoder:
    """Compel over a pipeline's two tokenizers / text encoders (penultimate hidden states, pooled from #2).

    ``clip_skip`` uses A1111's numbering relative to what SDXL was trained on: 1 is SDXL's own conditioning
    (the penultimate layer of both encoders, as diffusers' SDXL pipelines use with ``clip_skip=None``);
    2 skips one more layer (``hidden_states[-3]`` of both encoders, pooled embeddings unchanged), which is
    diffusers' SDXL ``clip_skip=1``: diffusers counts the layers skipped beyond the penultimate one, so its
    value is A1111's minus one.
    """

    def __init__(self, pipe: Any, device: torch.device, dtype: torch.dtype) -> None:
        self._pipe = pipe
        self._device = device
        self._skipping: dict[int, CompelForSDXL] = {}
        # CompelForSDXL = one Compel per encoder, both with PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED and
        # truncate_long_prompts=False, pooled embeddings from the second, positive and negative padded to the
        # same number of 77-token chunks. (Compel's list-of-encoders form is deprecated in 2.x and fails to
        # pad prompts of different lengths.)
        self._compel = CompelForSDXL(pipe, device=str(device))
        self._dtype = dtype
        self._zeros_for_empty = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
        # Compel parses every prompt with pyparsing, once per text encoder: 10-15 ms of Python per parse,
        # four per job, more than the tiny demo model's whole text encoding. Parse each text once for both
        # encoders and keep recent parses (the negative prompt is often the same default for every job);
        # packrat memoising makes each parse faster. Parsing is pure: the embeddings are the same.
        pyparsing.ParserElement.enable_packrat()
        self._parse = functools.lru_cache(maxsize=64)(Compel.parse_prompt_string)
        self._share_parser(self._compel)

    def _share_parser(self, compel_sdxl: CompelForSDXL) -> None:
        for compel in (compel_sdxl.compel_1, compel_sdxl.compel_2):
            setattr(compel, "parse_prompt_string", self._parse)  # noqa: B010 - shadows the classmethod

    def _compel_for(self, clip_skip: int) -> CompelForSDXL:
        if clip_skip <= 1:
            return self._compel
        compel = self._skipping.get(clip_skip)
        if compel is None:
            pipe = self._pipe
            skipping = types.SimpleNamespace(
                tokenizer=pipe.tokenizer,
                tokenizer_2=pipe.tokenizer_2,
                text_encoder=_SkipLayers(pipe.text_encoder, clip_skip - 1),
                text_encoder_2=_SkipLayers(pipe.text_encoder_2, clip_skip - 1),
            )
            compel = CompelForSDXL(skipping, device=str(self._device))
            self._share_parser(compel)
            self._skipping[clip_skip] = compel
        return compel

    @torch.no_grad()
    def encode(self, prompt: str, negative_prompt: str, clip_skip: int = 1) -> PromptEmbeddings:
        # SDXL was trained with dropped captions as zero embeddings, and its pipeline config says so
        # (`force_zeros_for_empty_prompt`): diffusers' SDXL pipelines then give classifier-free guidance zeros
        # for "no negative prompt", not the encoding of "" (so "" is not encoded at all).
        zeros = self._zeros_for_empty and not negative_prompt.strip()
        out = self._compel_for(clip_skip)(prompt, negative_prompt=None if zeros else negative_prompt)
        negative, negative_pooled = out.negative_embeds, out.negative_pooled_embeds
        if zeros:
            negative, negative_pooled = torch.zeros_like(out.embeds), torch.zeros_like(out.pooled_embeds)
        return PromptEmbeddings(
            prompt_embeds=out.embeds.to(self._dtype),
            pooled_prompt_embeds=out.pooled_embeds.to(self._dtype),
            negative_prompt_embeds=negative.to(self._dtype),
            negative_pooled_prompt_embeds=negative_pooled.to(self._dtype),
        )


def trigger_words_for(choices: Sequence[tuple[str, float]], words: dict[str, list[str] | None]) -> list[str]:
    """Trigger words of the LoRAs that are actually applied (weight ≠ 0), in request order."""
    out: list[str] = []
    for name, weight in choices:
        if weight != 0:
            out.extend(words.get(name) or [])
    return out
