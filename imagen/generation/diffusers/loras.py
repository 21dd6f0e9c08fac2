"""LoRA switching on one loaded pipeline: one interface, two ways of doing it.

The engine builds one :class:`LoraSwitcher` per loaded pipeline (:func:`lora_switcher`) and calls
:meth:`LoraSwitcher.activate` once per job with the LoRAs that job asks for. Either way each LoRA file is
read once per pipeline, LoRAs are never merged into the base weights, and a LoRA not requested has no
effect at all (a job without LoRA gives the same bytes before and after LoRAs were used).

* :class:`AdapterLoras` (default): each LoRA becomes a named PEFT adapter, switched with ``set_adapters`` /
  ``disable_lora``. Adding an adapter changes the module structure, which a compiled UNet would recompile.
* :class:`HotswapLoras` (``IMAGEN_LORA_HOTSWAP``, on with compile): the UNet part of a LoRA is copied into
  fixed adapter "slots" whose shapes never change, so the compiled graphs are reused.
"""

from __future__ import annotations

import contextlib
import logging
import re
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file

from imagen.errors import FatalGenerationError, is_out_of_memory
from imagen.registry import LoraSpec, safe_files

log = logging.getLogger(__name__)

# A job's LoRAs: (registry entry, weight), weight ≠ 0.
ActiveLoras = Sequence[tuple[LoraSpec, float]]


def adapter_name(lora_id: str) -> str:
    """PEFT adapter names end up in module dict keys: no dots."""
    return "lora_" + re.sub(r"[^A-Za-z0-9_]", "_", lora_id) + f"_{zlib.crc32(lora_id.encode()) % 10_000:04d}"


@contextlib.contextmanager
def lora_errors(message: str) -> Iterator[None]:
    """A LoRA that does not match the model fails the job for good; out of memory stays retryable."""
    try:
        yield
    except (ValueError, KeyError, RuntimeError) as exc:
        if is_out_of_memory(exc):
            raise
        raise FatalGenerationError(f"{message}: {exc}") from exc


def read_lora_file(lora: LoraSpec) -> dict[str, torch.Tensor]:
    try:
        safe_files.lora_format(lora.path)
    except safe_files.UnsafeFileError as exc:
        raise FatalGenerationError(f"LoRA {lora.id!r}: {exc}") from exc
    return load_file(str(lora.path))


class LoraSwitcher(ABC):
    """Puts exactly the requested LoRAs, at their weights, in effect on one pipeline."""

    def __init__(self, pipe: Any, model_id: str) -> None:
        self.pipe = pipe
        self.model_id = model_id
        # Whether the last job left a LoRA in effect (the fused attention processors would bypass it).
        self.any_active = False

    def activate(self, active: ActiveLoras) -> int:
        """Before a job: these LoRAs (weight ≠ 0) and no other. Returns how many LoRA files it read."""
        reads = 0
        for lora, _weight in active:
            if not self._knows(lora.id):
                state = read_lora_file(lora)
                with lora_errors(f"LoRA {lora.id!r} does not fit model {self.model_id!r}"):
                    self._add(lora.id, state)
                reads += 1
        with lora_errors(f"LoRA switch failed on model {self.model_id!r}"):
            self._switch([(lora.id, weight) for lora, weight in active])
        self.any_active = bool(active)
        return reads

    @abstractmethod
    def _knows(self, lora_id: str) -> bool: ...

    @abstractmethod
    def _add(self, lora_id: str, state: dict[str, torch.Tensor]) -> None:
        """Take in a LoRA file's tensors (once per pipeline)."""

    @abstractmethod
    def _switch(self, active: list[tuple[str, float]]) -> None:
        """Make exactly these (known) LoRAs act, at these weights."""


def lora_switcher(pipe: Any, model_id: str, hotswap: bool, max_loras: int, hotswap_rank: int) -> LoraSwitcher:
    if hotswap:
        return HotswapLoras(pipe, model_id, max_loras, hotswap_rank)
    return AdapterLoras(pipe, model_id)


class AdapterLoras(LoraSwitcher):
    """One named PEFT adapter per LoRA, switched with ``set_adapters``."""

    def __init__(self, pipe: Any, model_id: str) -> None:
        super().__init__(pipe, model_id)
        self.adapters: dict[str, str] = {}  # LoRA id -> adapter name
        self._enabled = False

    def _knows(self, lora_id: str) -> bool:
        return lora_id in self.adapters

    def _add(self, lora_id: str, state: dict[str, torch.Tensor]) -> None:
        name = adapter_name(lora_id)
        self.pipe.load_lora_weights(state, adapter_name=name)
        self.adapters[lora_id] = name
        self._enabled = True  # loading an adapter enables LoRA layers

    def _switch(self, active: list[tuple[str, float]]) -> None:
        if not active:
            if self._enabled:
                self.pipe.disable_lora()
                self._enabled = False
            return
        if not self._enabled:
            self.pipe.enable_lora()
            self._enabled = True
        self.pipe.set_adapters([self.adapters[lora_id] for lora_id, _ in active], [w for _, w in active])


@dataclass
class _UnetLora:
    diffusers_state: dict[str, torch.Tensor]  # "unet.*" keys, as lora_state_dict converted them
    network_alphas: dict[str, float] | None
    peft_state: dict[str, torch.Tensor]  # PEFT layout, no adapter name (for hotswap)
    config: Any  # peft LoraConfig
    rank: int


@dataclass
class _Slot:
    name: str
    resident: str | None = None
    base_scaling: list[tuple[Any, Any]] = field(default_factory=list)  # (LoRA layer, its scale for weight 1)


class HotswapLoras(LoraSwitcher):
    """UNet LoRAs switched by hotswapping weights into fixed PEFT adapters ("slots"), for a compiled UNet.

    A job with k LoRAs always runs slots ``0..k-1``; a slot is created (LoRA layers injected, ranks padded to
    ``target_rank``, scalings turned into tensors: ``peft.utils.hotswap.prepare_model_for_compiled_hotswap``)
    the first time it is needed, and afterwards receives another LoRA by copying its weights in place
    (``hotswap_adapter_from_state_dict``) and filling its scaling tensors. Nothing about the module structure,
    shapes or Python constants changes, so the compiled graphs (one without LoRA, one per number of LoRAs)
    are reused. A LoRA that cannot be swapped into a slot (it targets layers the slot lacks, or has a higher
    rank than ``target_rank``) replaces the slot instead: correct, but the UNet recompiles.
    Text-encoder parts (never compiled) stay ordinary named adapters, switched with ``set_adapters``.
    """

    def __init__(self, pipe: Any, model_id: str, count: int, target_rank: int) -> None:
        super().__init__(pipe, model_id)
        self.target_rank = target_rank
        self.slots = [_Slot(name=f"imagen_slot_{i}") for i in range(max(count, 1))]
        self.created = 0
        self.unet_loras: dict[str, _UnetLora] = {}
        self.text_adapters: dict[str, str] = {}  # LoRA id -> adapter name in the text encoders
        self.known: set[str] = set()
        self.swaps = 0
        self.slot_rebuilds = 0

    def _knows(self, lora_id: str) -> bool:
        return lora_id in self.known

    def _add(self, lora_id: str, state: dict[str, torch.Tensor]) -> None:
        """Convert a LoRA file once: text-encoder parts become adapters, the UNet part stays in RAM."""
        from diffusers.utils.peft_utils import _create_lora_config  # untyped, internal but stable since 0.28
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

        pipe = self.pipe
        name = adapter_name(lora_id)
        converted, alphas = pipe.lora_state_dict(dict(state), unet_config=pipe.unet.config)
        if not all("lora" in key for key in converted):
            raise ValueError("not a LoRA state dict")
        for encoder, prefix in ((pipe.text_encoder, "text_encoder"), (pipe.text_encoder_2, "text_encoder_2")):
            if any(key.startswith(prefix + ".") for key in converted):
                pipe.load_lora_into_text_encoder(
                    converted,
                    network_alphas=alphas,
                    text_encoder=encoder,
                    prefix=prefix,
                    adapter_name=name,
                    _pipeline=pipe,
                )
                self.text_adapters[lora_id] = name
        unet_state = {k: v for k, v in converted.items() if k.startswith("unet.")}
        if unet_state:
            peft_state = {k.removeprefix("unet."): v for k, v in unet_state.items()}
            if "lora_A" not in next(iter(peft_state)):
                peft_state = convert_unet_state_dict_to_peft(peft_state)  # type: ignore[no-untyped-call]
            ranks = {f"^{k}": v.shape[1] for k, v in peft_state.items() if "lora_B" in k and v.ndim > 1}
            unet_alphas = None
            if alphas:
                unet_alphas = {k.removeprefix("unet."): v for k, v in alphas.items() if k.startswith("unet.")}
            config = _create_lora_config(  # type: ignore[no-untyped-call]
                peft_state,
                unet_alphas,
                None,
                ranks,
                model_state_dict=pipe.unet.state_dict(),
                adapter_name=name,
            )
            self.unet_loras[lora_id] = _UnetLora(
                diffusers_state=unet_state,
                network_alphas=alphas,
                peft_state=peft_state,
                config=config,
                rank=max(ranks.values(), default=0),
            )
        self.known.add(lora_id)

    def _switch(self, active: list[tuple[str, float]]) -> None:
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        pipe = self.pipe
        unet_active = [(lora_id, weight) for lora_id, weight in active if lora_id in self.unet_loras]
        if len(unet_active) > len(self.slots):
            raise ValueError(f"at most {len(self.slots)} LoRAs at once")
        wanted = [lora_id for lora_id, _ in unet_active]
        count = len(wanted)
        # Slots 0..k-1: keep a LoRA where it already is, put the others in the remaining ones.
        placed: dict[int, str] = {}
        for index in range(count):
            resident = self.slots[index].resident
            if resident is not None and resident in wanted:
                placed[index] = resident
        missing = [lora_id for lora_id in wanted if lora_id not in placed.values()]
        for index in range(count):
            if index not in placed:
                placed[index] = missing.pop(0)
                self._put(index, placed[index])
        weights = dict(unet_active)
        for index in range(count):
            slot = self.slots[index]
            weight = weights[placed[index]]
            for layer, base in slot.base_scaling:
                current = layer.scaling[slot.name]
                if isinstance(current, torch.Tensor):
                    torch.mul(base, weight, out=current)
                else:
                    layer.scaling[slot.name] = base * weight
        if self.created:
            unet = pipe.unet
            if count == 0:
                unet.disable_lora()
            else:
                unet.enable_lora()
                names = [self.slots[i].name for i in range(count)]
                for layer in self._lora_layers():
                    layer.set_adapter(names)
        for encoder in (pipe.text_encoder, pipe.text_encoder_2):
            loaded = getattr(encoder, "peft_config", {})
            if not loaded:
                continue
            pairs = [(self.text_adapters[i], w) for i, w in active if self.text_adapters.get(i) in loaded]
            if pairs:
                enable_lora_for_text_encoder(encoder)
                set_adapters_for_text_encoder([n for n, _ in pairs], encoder, [w for _, w in pairs])
            else:
                disable_lora_for_text_encoder(encoder)

    def _lora_layers(self) -> list[Any]:
        from peft.tuners.lora import LoraLayer

        return [module for module in self.pipe.unet.modules() if isinstance(module, LoraLayer)]

    def _put(self, index: int, lora_id: str) -> None:
        slot = self.slots[index]
        lora = self.unet_loras[lora_id]
        unet = self.pipe.unet
        if index < self.created and lora.rank <= self.target_rank:
            try:
                self._hotswap(slot, lora)
            except (RuntimeError, ValueError) as exc:  # targets layers this slot lacks: rebuild the slot
                log.info("LoRA %s cannot go into %s by hotswap (%s): rebuilding it", lora_id, slot.name, exc)
                unet.delete_adapters(slot.name)
                self._create(slot, lora)
                self.slot_rebuilds += 1
        else:
            if index < self.created:
                unet.delete_adapters(slot.name)
                self.slot_rebuilds += 1
            self._create(slot, lora)
            self.created = max(self.created, index + 1)
        slot.resident = lora_id
        slot.base_scaling = [
            (layer, value.clone() if isinstance(value, torch.Tensor) else float(value))
            for layer in self._lora_layers()
            if (value := layer.scaling.get(slot.name)) is not None
        ]
        self.swaps += 1

    def _create(self, slot: _Slot, lora: _UnetLora) -> None:
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        unet = self.pipe.unet
        unet.load_lora_adapter(
            lora.diffusers_state,
            prefix="unet",
            network_alphas=lora.network_alphas,
            adapter_name=slot.name,
            _pipeline=self.pipe,
        )
        prepare_model_for_compiled_hotswap(
            unet,
            target_rank=max(self.target_rank, lora.rank),
            config=unet.peft_config[slot.name],
            check_compiled="ignore",
        )

    def _hotswap(self, slot: _Slot, lora: _UnetLora) -> None:
        from peft.utils.hotswap import hotswap_adapter_from_state_dict

        existing = self.pipe.unet.peft_config[slot.name]
        for key in ("use_rslora", "use_dora", "lora_bias"):
            if getattr(existing, key, None) != getattr(lora.config, key, None):
                raise ValueError(f"{key} differs")
        state = {}
        for key, value in lora.peft_state.items():
            if key.endswith(("lora_A.weight", "lora_B.weight")):
                key = key[: -len(".weight")] + f".{slot.name}.weight"
            elif key.endswith("lora_B.bias"):
                key = key[: -len(".bias")] + f".{slot.name}.bias"
            state[key] = value
        # The alphas/ranks come from this LoRA's own config: per-layer scalings are set from it (peft's
        # config-compatibility check only guards against keeping the previous adapter's alphas).
        hotswap_adapter_from_state_dict(
            model=self.pipe.unet, state_dict=state, adapter_name=slot.name, config=lora.config
        )
