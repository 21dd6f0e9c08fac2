"""AUTOMATIC1111's ``<lora:name:weight>`` prompt tags: found, removed from the prompt (as A1111 does), and
resolved against the registry by LoRA id or by its file's stem.

``<lora:name>`` weighs 1.0 (A1111's default); ``<lora:name:te:unet>`` takes its first weight. A name the
registry does not know, or a weight that is not a number, is reported (A1111 drops such a tag with a
warning in its console; a client of ours gets a 422 instead: nothing asked for is silently left out).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from imagen.registry import Registry

_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>", re.IGNORECASE)
DEFAULT_TAG_WEIGHT = 1.0


@dataclass
class PromptTags:
    prompt: str  # without the tags
    loras: list[tuple[str, float]] = field(default_factory=list)  # (registry id, weight), first mention wins
    unknown: list[str] = field(default_factory=list)  # names the registry does not know
    bad_weights: list[str] = field(default_factory=list)  # the tags whose weight is not a number


def lora_id(name: str, registry: Registry) -> str | None:
    """The registry id of a LoRA named by its id or its file's stem (case-insensitive for the stem)."""
    if registry.lora(name) is not None:
        return name
    for lora in registry.loras:
        if lora.path.stem == name or lora.path.stem.lower() == name.lower():
            return lora.id
    return None


def parse_lora_tags(prompt: str, registry: Registry) -> PromptTags:
    found = PromptTags(prompt="")
    seen: set[str] = set()
    for match in _TAG.finditer(prompt):
        name = match[1].strip()
        weights = [part for part in match[2].split(":") if part.strip()]
        try:
            weight = float(weights[0]) if weights else DEFAULT_TAG_WEIGHT
        except ValueError:
            found.bad_weights.append(match[0])
            continue
        resolved = lora_id(name, registry)
        if resolved is None:
            found.unknown.append(name)
        elif resolved not in seen:
            seen.add(resolved)
            found.loras.append((resolved, weight))
    # the prompt without its tags, with the spaces and commas they leave tidied
    cleaned = _TAG.sub("", prompt)
    cleaned = re.sub(r"\s*,(\s*,)+", ",", cleaned)
    cleaned = re.sub(r"[ \t]{2,}", " ", cleaned).strip().strip(",").strip()
    found.prompt = cleaned
    return found
