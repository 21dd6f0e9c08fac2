"""Textual inversions (embeddings): SDXL ones as AUTOMATIC1111 and civitai ship them, one ``.safetensors``
holding ``clip_l`` (the first text encoder's vectors) and ``clip_g`` (the second's), loaded into a pipeline's
two tokenizers and text encoders with diffusers' own ``load_textual_inversion``. A prompt uses one by writing
its name; a multi-vector embedding's name is expanded to its tokens (``name name_1 ...``) before Compel reads
the prompt, as diffusers' pipelines do."""

from __future__ import annotations

import re
from typing import Any

from safetensors.torch import load_file

from imagen.errors import FatalGenerationError
from imagen.registry import EmbeddingSpec, safe_files


def pool_at_end_of_text(pipe: Any) -> None:
    """Make both text encoders read their pooled embedding at the end-of-text token, as CLIP does, whatever
    tokens were added: their ``eos_token_id`` set to the tokenizer's (49407) instead of the legacy 2.

    With 2 (SDXL's own configs and the demo model's), transformers takes the pooled embedding at the token of
    the highest id: the end of text for a prompt of vocabulary tokens, but an embedding's added token (ids
    from 49408 on) where the prompt writes one, whose hidden state has seen only the words before it (the demo
    model then lost the background the prompt asked for). For prompts without an added token both ways pick
    the same position (the end-of-text token has the highest id of the vocabulary; the first is taken), so
    nothing else changes (tests/test_demo_embedding.py, tests/test_embeddings.py)."""
    eos = int(pipe.tokenizer.eos_token_id)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.config.eos_token_id = eos
        for module in encoder.modules():
            if "eos_token_id" in vars(module):
                module.eos_token_id = eos


def load_embedding(pipe: Any, spec: EmbeddingSpec) -> None:
    """``spec``'s vectors into both of ``pipe``'s text encoders, under its name."""
    pool_at_end_of_text(pipe)
    try:
        safe_files.check_embedding(spec.path)
        state = load_file(str(spec.path))
        for key, encoder, tokenizer in (
            ("clip_l", pipe.text_encoder, pipe.tokenizer), ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)
        ):
            pipe.load_textual_inversion(state[key], token=spec.name, text_encoder=encoder, tokenizer=tokenizer)
    except (safe_files.UnsafeFileError, OSError, ValueError, RuntimeError) as exc:
        raise FatalGenerationError(f"embedding {spec.name!r} could not be loaded: {exc}") from exc


def used_in(text: str, names: list[str]) -> list[str]:
    """The embedding names ``text`` writes, as words (A1111 matches them so), in the order given."""
    return [name for name in names if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)]


def expanded(pipe: Any, text: str) -> str:
    """``text`` with each multi-vector embedding's name written as its tokens (what the encoders know)."""
    return str(pipe.maybe_convert_prompt(text, pipe.tokenizer))
