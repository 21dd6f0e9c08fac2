"""Components held once across models: a VAE or text encoder that two checkpoints have byte for byte.

SDXL fine-tunes often keep SDXL's text encoders and VAE unchanged (or several registry entries name the same
``vae_path``): loading each checkpoint whole would hold those weights twice. Before a model loads,
:class:`ComponentHashes` gives each of its shareable components a content hash; :class:`SharedComponents`
keeps the loaded module of each hash (weakly: it lives as long as a held model uses it) and the loader is
handed the modules already in memory instead of reading them again.

* **What a hash covers**: the component's config (``config.json``) and its weights' bytes. A diffusers
  folder: each ``.safetensors`` file of the component's subfolder, hashed whole; a single-file checkpoint:
  the tensors under the component's key prefix (name, dtype, shape, bytes), in one pass over the file. Two
  entries match when they store the same weights in the same layout (a folder and a single file of the same
  weights do not match: their keys and some shapes differ; that costs memory, never correctness).
* **Cheap**: each file is read once per version (path, size, modification time) per process; the read also
  warms the page cache for the load that follows.
* **Never the UNet**: LoRAs, the IP-Adapter and the fused-attention switch change a UNet's modules per job,
  and two checkpoints with the same UNet are the same model.
* **LoRAs**: PEFT adapters go into the text encoders. Before a model's first job with a LoRA, its text
  encoders leave the pool (:meth:`SharedComponents.forget`): one another held model also uses gets a
  private copy first, so a LoRA on one model never changes another's prompt encoding. The VAE is never
  LoRA'd and stays shared.
* **Acceleration** (channels_last, fused QKV, compile) is applied to a shared VAE once: the first model
  that loads it prepares it (see :mod:`.acceleration`).
"""

from __future__ import annotations

import hashlib
import struct
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imagen.generation.diffusers.components import SDXL_CONFIG_DIR
from imagen.registry import ModelSpec, safe_files

SHAREABLE = ("vae", "text_encoder", "text_encoder_2")
LORA_TARGETS = ("text_encoder", "text_encoder_2")  # what a LoRA may change besides the (never shared) UNet

# Where each component's tensors sit in an original-layout (StabilityAI / civitai) SDXL checkpoint.
SINGLE_FILE_PREFIXES = {
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.",
    "text_encoder_2": "conditioner.embedders.1.",
}
_CHUNK = 8 << 20


class ComponentHashes:
    """Content hashes of a registry entry's shareable components, each file read once per version."""

    def __init__(self) -> None:
        # (path, size, mtime_ns) -> digest (a whole file) or digests by key prefix (a single-file checkpoint)
        self._files: dict[tuple[str, int, int], str] = {}
        self._prefixed: dict[tuple[str, int, int], dict[str, str]] = {}
        self.files_read = 0

    def of(self, spec: ModelSpec) -> dict[str, str]:
        """``{component: hash}`` for the components this entry's files let us hash (others: not shared);
        none for an entry with a file that is not a readable safetensors file: the loader, which checks each
        file before reading it, says what is wrong with it."""
        try:
            return self._of(spec)
        except (safe_files.UnsafeFileError, OSError, ValueError):
            return {}

    def _of(self, spec: ModelSpec) -> dict[str, str]:
        if spec.path is None:
            return {}
        path = Path(spec.path)
        hashes: dict[str, str] = {}
        if path.is_dir():
            for name in SHAREABLE:
                digest = self._folder_component(path / name)
                if digest is not None:
                    hashes[name] = digest
        elif path.is_file():
            config = path.with_name(path.stem + ".config")
            config = config if config.is_dir() else SDXL_CONFIG_DIR
            by_prefix = self._single_file(path)
            for name, prefix in SINGLE_FILE_PREFIXES.items():
                if prefix in by_prefix:
                    hashes[name] = _combine(name, _config_bytes(config / name), [by_prefix[prefix]])
        if spec.vae_path is not None:
            hashes.pop("vae", None)
            vae = self._vae(Path(spec.vae_path))
            if vae is not None:
                hashes["vae"] = vae
        return hashes

    def _folder_component(self, folder: Path) -> str | None:
        weights = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        for file in weights:
            safe_files.read_safetensors_header(file)  # a pickle renamed: not ours to read, even to hash
        if not weights:
            return None
        return _combine(folder.name, _config_bytes(folder), [self._file(file) for file in weights])

    def _vae(self, path: Path) -> str | None:
        if path.is_dir():
            return self._folder_component(path)
        if not path.is_file():
            return None
        safe_files.read_safetensors_header(path)
        config = path.with_name(path.stem + ".config")
        config_bytes = _config_bytes(config) if (config / "config.json").is_file() else _config_bytes(
            (config if config.is_dir() else SDXL_CONFIG_DIR) / "vae"
        )
        return _combine("vae", config_bytes, [self._file(path)])

    def _file(self, path: Path) -> str:
        key = _version(path)
        digest = self._files.get(key)
        if digest is None:
            hasher = hashlib.sha256()
            with path.open("rb") as file:
                while chunk := file.read(_CHUNK):
                    hasher.update(chunk)
            digest = self._files[key] = hasher.hexdigest()
            self.files_read += 1
        return digest

    def _single_file(self, path: Path) -> dict[str, str]:
        key = _version(path)
        digests = self._prefixed.get(key)
        if digests is None:
            digests = self._prefixed[key] = _prefix_digests(path, tuple(SINGLE_FILE_PREFIXES.values()))
            self.files_read += 1
        return digests


class SharedComponents:
    """The loaded module of each component hash, while a held model uses it."""

    def __init__(self) -> None:
        self._modules: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self._hash_of: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

    def reusable(self, hashes: Mapping[str, str]) -> dict[str, Any]:
        """The modules already in memory for these hashes, by component name."""
        found = {}
        for name, digest in hashes.items():
            module = self._modules.get(digest)
            if module is not None:
                found[name] = module
        return found

    def register(self, pipe: Any, hashes: Mapping[str, str]) -> None:
        """A freshly loaded pipeline's components become reusable (those not yet in the pool)."""
        for name, digest in hashes.items():
            module = getattr(pipe, name, None)
            if module is not None and digest not in self._modules:
                self._modules[digest] = module
                self._hash_of[module] = digest

    def pooled(self, module: Any) -> bool:
        return module in self._hash_of

    def forget(self, module: Any) -> None:
        """The module is about to change (a LoRA goes in): never handed to another model again."""
        digest = self._hash_of.pop(module, None)
        if digest is not None and self._modules.get(digest) is module:
            del self._modules[digest]


def _version(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _config_bytes(folder: Path) -> bytes:
    config = folder / "config.json"
    return config.read_bytes() if config.is_file() else b""


def _combine(name: str, config: bytes, digests: list[str]) -> str:
    hasher = hashlib.sha256(name.encode() + b"\0" + hashlib.sha256(config).digest())
    for digest in digests:
        hasher.update(digest.encode())
    return hasher.hexdigest()


def _prefix_digests(path: Path, prefixes: tuple[str, ...]) -> dict[str, str]:
    """One pass over a safetensors file: a digest of the tensors (name, dtype, shape, bytes) under each
    prefix, in the file's order."""
    hashers: dict[str, Any] = {}
    header = safe_files.read_safetensors_header(path)  # checked: a safetensors file, its header's length sane
    with path.open("rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        base = 8 + header_size
        entries = sorted(
            (info["data_offsets"][0], info["data_offsets"][1], key, info)
            for key, info in header.items()
            if key != "__metadata__"
        )
        for start, end, key, info in entries:
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is None:
                continue
            hasher = hashers.setdefault(prefix, hashlib.sha256())
            hasher.update(f"{key[len(prefix):]}|{info['dtype']}|{info['shape']}|".encode())
            file.seek(base + start)
            left = end - start
            while left > 0:
                chunk = file.read(min(_CHUNK, left))
                if not chunk:
                    break
                hasher.update(chunk)
                left -= len(chunk)
    return {prefix: hasher.hexdigest() for prefix, hasher in hashers.items()}
