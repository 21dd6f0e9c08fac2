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


def load_embedding(pipe: Any, spec: EmbeddingSpec) -> None:
    """``spec``'s vectors into both of ``pipe``'s text encoders, under its name."""
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
