"""Tiny, deterministic model files in the formats users have, built in code (never downloaded or committed).

``write_fixtures(directory)`` writes, from fixed seeds:

* ``models/sdxl-base/``: a tiny random-weight SDXL pipeline as a diffusers folder (safetensors);
* ``models/sdxl-single-file.safetensors``: the *same weights* as one checkpoint in the original
  StabilityAI / civitai key layout, with its tiny configs in ``models/sdxl-single-file.config/`` (a
  real-size checkpoint needs no such folder: the shipped SDXL configs are used);
* ``loras/``: ``anime-style`` (kohya LoRA, UNet + both text encoders), ``character-detail``
  (diffusers/PEFT layout), ``locon-detail`` (LyCORIS LoCon: convolutions too) and, listed only in
  ``registry-unsupported.yaml``, ``loha-style`` (LyCORIS LoHa, refused);
* ``ip-adapter/``: a tiny SDXL IP-Adapter (h94 layout) with its CLIP vision encoder, and
  ``reference/electra_ref.png``;
* ``controlnets/``: ``tiny-canny`` (a ControlNet made from the fixture UNet with ``ControlNetModel.from_unet``,
  as a diffusers folder), ``tiny-canny-single`` (the same weights as one ``.safetensors`` file, its config in
  a sibling ``.config/`` folder) and ``tiny-union`` (a ``ControlNetUnionModel``), their zero convolutions
  given random weights so that each changes the picture; the fixture models and ControlNets are of the base
  ``tiny-sdxl``;
* ``registry.yaml`` naming them all (native size 64 so that tests run fast).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from imagen.generation.diffusers.components import FIXTURE_SHAPE, build_tiny_refiner_pipeline, build_tiny_sdxl_pipeline
from imagen.registry import LoraSpec
from imagen.testing import ldm_export
from imagen.testing.upscaler_fixtures import write_tiny_esrgan

FIXTURE_SEED = 1234
LORA_RANK = 4
# kohya-ss sd-scripts adapts all of these in each CLIP layer.
KOHYA_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "mlp.fc1", "mlp.fc2")


def _randn(generator: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator) * scale).contiguous()


def _linear_modules(module: torch.nn.Module, suffixes: tuple[str, ...]) -> list[tuple[str, torch.nn.Linear]]:
    return [
        (n, m) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(suffixes)
    ]


def _text_module_name(name: str) -> str:
    return name if name.startswith("text_model.") else "text_model." + name


def _kohya_pair(
    out: dict[str, torch.Tensor], key: str, down: torch.Tensor, up: torch.Tensor, alpha: float
) -> None:
    out[f"{key}.lora_down.weight"] = down
    out[f"{key}.lora_up.weight"] = up
    out[f"{key}.alpha"] = torch.tensor(alpha)


def _kohya_lora(pipe: Any, seed: int, with_conv: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    config = dict(pipe.unet.config)
    out: dict[str, torch.Tensor] = {}
    attn = (
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
    )
    for name, layer in _linear_modules(pipe.unet, attn):
        key = "lora_unet_" + ldm_export.unet_module_to_ldm(name, config).replace(".", "_")
        _kohya_pair(
            out,
            key,
            _randn(gen, LORA_RANK, layer.in_features, scale=0.5),
            _randn(gen, layer.out_features, LORA_RANK, scale=0.5),
            float(LORA_RANK),
        )
    if with_conv:
        for name, conv in pipe.unet.named_modules():
            if (
                isinstance(conv, torch.nn.Conv2d)
                and ".resnets." in name
                and name.endswith(("conv1", "conv2"))
            ):
                key = "lora_unet_" + ldm_export.unet_module_to_ldm(name, config).replace(".", "_")
                k = conv.kernel_size
                _kohya_pair(
                    out,
                    key,
                    _randn(gen, LORA_RANK, conv.in_channels, k[0], k[1], scale=0.3),
                    _randn(gen, conv.out_channels, LORA_RANK, 1, 1, scale=0.3),
                    float(LORA_RANK),
                )
    else:
        for prefix, encoder in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
            for name, layer in _linear_modules(encoder, KOHYA_TEXT_TARGETS):
                key = prefix + _text_module_name(name).replace(".", "_")
                _kohya_pair(
                    out,
                    key,
                    _randn(gen, LORA_RANK, layer.in_features, scale=0.5),
                    _randn(gen, layer.out_features, LORA_RANK, scale=0.5),
                    float(LORA_RANK),
                )
    return out


def _peft_lora(pipe: Any, seed: int) -> dict[str, torch.Tensor]:
    """diffusers / PEFT layout: ``unet.<module>.lora_A.weight`` / ``lora_B.weight``."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, layer in _linear_modules(pipe.unet, ("to_q", "to_k", "to_v", "to_out.0")):
        out[f"unet.{name}.lora_A.weight"] = _randn(gen, LORA_RANK, layer.in_features, scale=0.5)
        out[f"unet.{name}.lora_B.weight"] = _randn(gen, layer.out_features, LORA_RANK, scale=0.5)
    for name, layer in _linear_modules(pipe.text_encoder_2, ("self_attn.q_proj", "self_attn.k_proj")):
        key = f"text_encoder_2.{_text_module_name(name)}"
        out[f"{key}.lora_A.weight"] = _randn(gen, LORA_RANK, layer.in_features, scale=0.5)
        out[f"{key}.lora_B.weight"] = _randn(gen, layer.out_features, LORA_RANK, scale=0.5)
    return out


def _loha(pipe: Any, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    config = dict(pipe.unet.config)
    out: dict[str, torch.Tensor] = {}
    for name, layer in _linear_modules(pipe.unet, ("attn1.to_q",)):
        key = "lora_unet_" + ldm_export.unet_module_to_ldm(name, config).replace(".", "_")
        out[f"{key}.hada_w1_a"] = _randn(gen, layer.out_features, LORA_RANK)
        out[f"{key}.hada_w1_b"] = _randn(gen, LORA_RANK, layer.in_features)
        out[f"{key}.hada_w2_a"] = _randn(gen, layer.out_features, LORA_RANK)
        out[f"{key}.hada_w2_b"] = _randn(gen, LORA_RANK, layer.in_features)
        out[f"{key}.alpha"] = torch.tensor(float(LORA_RANK))
    return out


def _single_file_state(pipe: Any) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    state.update(ldm_export.unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)))
    state.update(ldm_export.vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)))
    state.update(ldm_export.clip_to_ldm(pipe.text_encoder.state_dict()))
    state.update(ldm_export.open_clip_to_ldm(pipe.text_encoder_2.state_dict()))
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _write_single_file_configs(pipe_dir: Path, config_dir: Path) -> None:
    """Copy a diffusers folder's JSON configs (no weights, no tokenizer) into ``config_dir``."""
    for source in sorted(pipe_dir.rglob("*.json")):
        relative = source.relative_to(pipe_dir)
        if relative.parts[0].startswith("tokenizer"):
            continue
        target = config_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")


def _ip_adapter(pipe: Any, seed: int, directory: Path) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=37,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=4,
            )
        )
    encoder.save_pretrained(str(directory / "image_encoder"), safe_serialization=True)
    cross = int(pipe.unet.config.cross_attention_dim)
    tensors: dict[str, torch.Tensor] = {
        "image_proj.proj.weight": _randn(gen, cross * 4, 32, scale=0.2),
        "image_proj.proj.bias": torch.zeros(cross * 4),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    key_id = 1
    channels = list(pipe.unet.config.block_out_channels)
    for name in pipe.unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name.split(".")[1])]
        else:
            hidden = channels[int(name.split(".")[1])]
        tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = _randn(gen, hidden, cross, scale=0.5)
        tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = _randn(gen, hidden, cross, scale=0.5)
        key_id += 2
    save_file(tensors, str(directory / "ip-adapter_sdxl.safetensors"), metadata={"format": "pt"})


FIXTURE_BASE = "tiny-sdxl"
CONTROLNET_EMBEDDING = (8, 8, 16, 16)  # the conditioning embedding: three stride-2 stages, as the tiny VAE's 8x


def _controlnet(pipe: Any, seed: int, union: bool) -> Any:
    """A ControlNet from the fixture UNet whose zero-initialised output convolutions get random weights (a
    fresh ControlNet adds nothing: its outputs are zero until trained)."""
    model_class = diffusers.ControlNetUnionModel if union else diffusers.ControlNetModel
    controlnet = model_class.from_unet(pipe.unet, conditioning_embedding_out_channels=CONTROLNET_EMBEDDING)
    if union:
        # from_unet keeps the Union's own transformer at SDXL's width (320); the tiny UNet's is its own
        width = pipe.unet.config.block_out_channels[0]
        config = {name: value for name, value in controlnet.config.items() if not name.startswith("_")}
        config.update(num_trans_channel=width, num_proj_channel=width, num_trans_head=2)
        weights = controlnet.state_dict()
        torch.manual_seed(seed)
        controlnet = model_class.from_config(config)  # type: ignore[no-untyped-call]
        controlnet.load_state_dict(
            {name: value for name, value in weights.items() if value.shape == controlnet.state_dict()[name].shape},
            strict=False,
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        outputs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        outputs.append(controlnet.controlnet_cond_embedding.conv_out)
        for conv in outputs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.2)
    return controlnet


def _write_controlnets(pipe: Any, directory: Path) -> None:
    plain = _controlnet(pipe, FIXTURE_SEED + 30, union=False)
    plain.save_pretrained(str(directory / "tiny-canny"), safe_serialization=True)
    save_file(
        {name: tensor.contiguous() for name, tensor in plain.state_dict().items()},
        str(directory / "tiny-canny-single.safetensors"),
        metadata={"format": "pt"},
    )
    config_dir = directory / "tiny-canny-single.config"
    config_dir.mkdir(exist_ok=True)
    (config_dir / "config.json").write_text((directory / "tiny-canny" / "config.json").read_text("utf-8"), "utf-8")
    _controlnet(pipe, FIXTURE_SEED + 31, union=True).save_pretrained(
        str(directory / "tiny-union"), safe_serialization=True
    )


def _embedding(pipe: Any, seed: int, path: Path, vectors: int = 2) -> None:
    """An SDXL textual inversion as A1111 / civitai ship them: ``clip_l`` and ``clip_g``, ``vectors`` rows each,
    at the fixture's encoder widths; random, scaled like the encoders' own token embeddings."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, encoder in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
        table = encoder.get_input_embeddings().weight
        state[key] = (torch.randn(vectors, table.shape[1], generator=gen) * table.std() * 4).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})


def _reference_image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tile = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(tile, "RGB").resize((64, 64), Image.Resampling.NEAREST).save(path, format="PNG")


def write_fixtures(directory: Path) -> Path:
    """Write every fixture under ``directory`` and return the path of the registry YAML naming them."""
    directory = Path(directory)
    models, loras, ip_dir = directory / "models", directory / "loras", directory / "ip-adapter"
    controlnets = directory / "controlnets"
    for folder in (models, loras, ip_dir, controlnets):
        folder.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_sdxl_pipeline(FIXTURE_SHAPE, seed=FIXTURE_SEED)

    pipe.save_pretrained(str(models / "sdxl-base"), safe_serialization=True)
    save_file(
        _single_file_state(pipe), str(models / "sdxl-single-file.safetensors"), metadata={"format": "pt"}
    )
    _write_single_file_configs(models / "sdxl-base", models / "sdxl-single-file.config")

    save_file(_kohya_lora(pipe, FIXTURE_SEED + 10, with_conv=False), str(loras / "anime-style.safetensors"))
    save_file(_peft_lora(pipe, FIXTURE_SEED + 11), str(loras / "character-detail.safetensors"))
    save_file(_kohya_lora(pipe, FIXTURE_SEED + 12, with_conv=True), str(loras / "locon-detail.safetensors"))
    save_file(_loha(pipe, FIXTURE_SEED + 13), str(loras / "loha-style.safetensors"))

    _ip_adapter(pipe, FIXTURE_SEED + 20, ip_dir)
    _reference_image(directory / "reference" / "electra_ref.png", FIXTURE_SEED + 21)
    _write_controlnets(pipe, controlnets)
    refiner = build_tiny_refiner_pipeline(pipe, FIXTURE_SHAPE, seed=FIXTURE_SEED + 30)
    refiner.save_pretrained(str(models / "sdxl-refiner"), safe_serialization=True)
    refiner_state = {
        **ldm_export.unet_to_ldm(refiner.unet.state_dict(), dict(refiner.unet.config)),
        **ldm_export.vae_to_ldm(refiner.vae.state_dict(), dict(refiner.vae.config)),
        **ldm_export.open_clip_to_ldm(refiner.text_encoder_2.state_dict(), ldm_export.REFINER_TE_PREFIX),
    }
    save_file({k: v.detach().clone().contiguous() for k, v in refiner_state.items()},
              str(models / "sdxl-refiner-single-file.safetensors"), metadata={"format": "pt"})
    _write_single_file_configs(models / "sdxl-refiner", models / "sdxl-refiner-single-file.config")
    write_tiny_esrgan(directory / "upscalers", scale=4)
    _embedding(pipe, FIXTURE_SEED + 40, directory / "embeddings" / "tinyword.safetensors")

    size = FIXTURE_SHAPE.size
    negative = "low quality, blurry, distorted, ugly, bad anatomy"
    registry: dict[str, Any] = {
        "default_model": "sdxl-base",
        "models": [
            {
                "id": "sdxl-base",
                "name": "SDXL Base (tiny fixture)",
                "description": "diffusers folder",
                "path": "models/sdxl-base",
                "default_negative": negative,
                "prefix": "sdxl_base",
                "size": size,
                "base": FIXTURE_BASE,
            },
            {
                "id": "sdxl-single-file",
                "name": "SDXL single file (tiny fixture)",
                "description": "original-layout single-file checkpoint, same weights as sdxl-base",
                "path": "models/sdxl-single-file.safetensors",
                "default_negative": negative,
                "prefix": "sdxl_single",
                "size": size,
                "base": FIXTURE_BASE,
            },
            {
                "id": "sdxl-refiner",
                "name": "SDXL Refiner (tiny fixture)",
                "description": "diffusers folder: one text encoder, aesthetic-score conditioning",
                "path": "models/sdxl-refiner",
                "size": size,
                "base": FIXTURE_BASE,
                "refiner": True,
            },
            {
                "id": "sdxl-refiner-single-file",
                "name": "SDXL Refiner single file (tiny fixture)",
                "description": "original-layout single file, same weights as sdxl-refiner",
                "path": "models/sdxl-refiner-single-file.safetensors",
                "size": size,
                "base": FIXTURE_BASE,
                "refiner": True,
            },
        ],
        "loras": [
            {
                "id": "anime-style",
                "name": "Anime Style Enhancer",
                "description": "kohya LoRA (UNet + both TEs)",
                "path": "loras/anime-style.safetensors",
                "default_weight": 0.75,
                "trigger_words": ["anime style", "detailed"],
            },
            {
                "id": "character-detail",
                "name": "Character Detail Enhancement",
                "description": "diffusers/PEFT LoRA",
                "path": "loras/character-detail.safetensors",
                "default_weight": 0.6,
                "trigger_words": None,
            },
            {
                "id": "locon-detail",
                "name": "LoCon detail",
                "description": "LyCORIS LoCon (conv layers)",
                "path": "loras/locon-detail.safetensors",
                "default_weight": 0.8,
                "trigger_words": ["locon"],
            },
        ],
        "controlnets": [
            {
                "id": "tiny-canny",
                "name": "Tiny canny ControlNet",
                "description": "diffusers folder",
                "path": "controlnets/tiny-canny",
                "base": FIXTURE_BASE,
            },
            {
                "id": "tiny-canny-single",
                "name": "Tiny canny ControlNet (single file)",
                "description": "one .safetensors file, same weights as tiny-canny",
                "path": "controlnets/tiny-canny-single.safetensors",
                "base": FIXTURE_BASE,
            },
            {
                "id": "tiny-union",
                "name": "Tiny ControlNet Union",
                "description": "ControlNetUnionModel, diffusers folder",
                "path": "controlnets/tiny-union",
                "base": FIXTURE_BASE,
                "control_types": ["openpose", "depth", "softedge", "canny"],
            },
        ],
        "upscalers": [
            {
                "id": "tiny-esrgan",
                "name": "Tiny ESRGAN 4x",
                "description": "RRDBNet in the Real-ESRGAN key layout (spandrel's ESRGAN)",
                "path": "upscalers/tiny-esrgan-x4.safetensors",
            },
        ],
        "embeddings": [
            {
                "name": "tinyword",
                "description": "a two-vector textual inversion (clip_l + clip_g)",
                "path": "embeddings/tinyword.safetensors",
                "base": FIXTURE_BASE,
            },
        ],
        "ip_adapter": {
            "path": "ip-adapter/ip-adapter_sdxl.safetensors",
            "image_encoder_path": "ip-adapter/image_encoder",
            "reference_image": "reference/electra_ref.png",
        },
    }
    registry_path = directory / "registry.yaml"
    registry_path.write_text(yaml.safe_dump(registry, sort_keys=False), encoding="utf-8")
    unsupported = {
        "models": registry["models"][:1],
        "loras": [{"id": "loha-style", "name": "LoHa style", "path": "loras/loha-style.safetensors"}],
    }
    (directory / "registry-unsupported.yaml").write_text(
        yaml.safe_dump(unsupported, sort_keys=False), "utf-8"
    )
    (directory / "README.json").write_text(
        json.dumps({"generated_by": "imagen.testing.fixtures.write_fixtures", "seed": FIXTURE_SEED}, indent=2),
        "utf-8",
    )
    return registry_path


def write_attention_loras(pipe: Any, directory: Path, rank: int, seed: int, count: int = 2) -> list[LoraSpec]:
    """``count`` small random LoRAs in the diffusers/PEFT layout on every attention projection of ``pipe``'s
    UNet, written as files in ``directory``: the first of rank ``rank``, the others of half that (so that
    LoRA hotswap has to pad). For LoRA-switching benchmarks and tests on any model, full-size SDXL too."""
    specs = []
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    for index in range(count):
        gen = torch.Generator("cpu").manual_seed(seed + index)
        r = rank if index == 0 else max(1, rank // 2)
        state: dict[str, torch.Tensor] = {}
        for name, module in _linear_modules(pipe.unet, targets):
            if "attn" in name:
                state[f"unet.{name}.lora_A.weight"] = _randn(gen, r, module.in_features, scale=0.01)
                state[f"unet.{name}.lora_B.weight"] = _randn(gen, module.out_features, r, scale=0.01)
        path = directory / f"lora-{index}.safetensors"
        save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(path))
        specs.append(LoraSpec(id=f"lora-{index}", name=f"LoRA {index}", path=path))
    return specs
