"""A registry that follows its file: an edit of ``IMAGEN_REGISTRY_PATH`` is served without a restart.

Each process that serves or runs models keeps one :class:`RegistryWatcher` (the API, each embedded worker's
child, each distributed worker, which reads its own copy of the file) and asks it to look again: the API at
most once per ``RELOAD_CHECK_S`` as requests come (``refresh_due``, as the keys file is read again,
``imagen.access.keys``), a worker before each job and once a second while idle. Each look hashes the whole
content (the file is small): an edit that keeps the size and the modification time is noticed too.

What a look finds decides what is served:

- a file that reads, parses, validates, keeps the default model declared and (where the server checks them
  at start) names only usable weight files: exactly its entries, and a :class:`RegistryChange` saying which
  model ids came, went or changed, so that a worker frees what it holds of the ones that went or changed;
- anything else (no file, bad YAML, an invalid entry, the default model gone, a pickle named): the registry
  last read stays, and why is logged at ERROR, again every ``COMPLAINT_REPEAT_S`` while it lasts.

The built-in registry (no file configured) never changes. No torch here.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from imagen.errors import RegistryError
from imagen.registry.load import load_registry
from imagen.registry.safe_files import check_registry_files
from imagen.registry.specs import ModelSpec, Registry
from imagen.watched_files import Complaints, LookSchedule

log = logging.getLogger("imagen.registry")



@dataclass(frozen=True)
class RegistryChange:
    """What a new reading of the file changed: the registry now served, and model ids by fate."""

    registry: Registry
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()  # the same id with another entry (path, VAE, ...): a held copy is stale

    @property
    def stale(self) -> tuple[str, ...]:
        """The models a worker must free: gone from the file, or no longer what it loaded."""
        return (*self.removed, *self.changed)


def compare(old: Registry, new: Registry) -> RegistryChange:
    before = {model.id: model for model in old.models}
    after = {model.id: model for model in new.models}
    return RegistryChange(
        registry=new,
        added=tuple(model_id for model_id in after if model_id not in before),
        removed=tuple(model_id for model_id in before if model_id not in after),
        changed=tuple(
            model_id
            for model_id, model in after.items()
            if model_id in before and _entry(model) != _entry(before[model_id])
        ),
    )


def _entry(model: ModelSpec) -> tuple[dict[str, object], str | None]:
    return model.model_dump(), model.declared_vae_path


class RegistryWatcher:
    """The registry of ``path`` as last read well (see the module). ``current`` reads memory only;
    ``refresh`` reads the file (blocking I/O)."""

    def __init__(
        self,
        path: Path | None,
        *,
        registry: Registry | None = None,
        default_model: str | None = None,
        check_files: bool = False,
    ) -> None:
        """``registry``: the one already read at start from ``path`` (else it is read now: a broken file
        raises ``RegistryError`` and stops the start). ``default_model``: the configured default
        (``IMAGEN_DEFAULT_MODEL``) a new reading must still declare; ``check_files``: refuse a reading that
        names missing, pickle or unsupported weight files, as the start does on such a server."""
        self.path = path
        self.default_model = default_model
        self.check_files = check_files
        self._refresh_lock = threading.Lock()
        self._looks = LookSchedule()
        self._content_digest: bytes | None = self._digest() if path is not None else None
        self._current = registry if registry is not None else load_registry(path)
        self._complaints = Complaints(log)

    @property
    def current(self) -> Registry:
        return self._current

    def refresh_due(self) -> bool:
        """True, to one caller per ``RELOAD_CHECK_S``, when the file should be looked at again."""
        return self.path is not None and self._looks.due()

    def refresh(self) -> RegistryChange | None:
        """Look at the file again; what changed when a new reading is served now, else None."""
        if self.path is None:
            return None
        with self._refresh_lock:
            digest = self._digest()
            if digest is None:
                self._complaints.complain(
                    f"registry file {self.path} is gone or unreadable: the registry last read is kept"
                )
                return None
            if digest == self._content_digest:
                self._complaints.repeat()
                return None
            self._content_digest = digest
            try:
                registry = load_registry(self.path)
                registry.resolve_default_model(self.default_model)
                if self.check_files:
                    check_registry_files(registry)
            except RegistryError as exc:
                self._complaints.complain(
                    f"registry file {self.path} changed but is not usable; the registry last read is kept "
                    f"({len(self._current.models)} model(s)). {exc}"
                )
                return None
            change = compare(self._current, registry)
            self._current = registry
            self._complaints.clear()
            log.info(
                "registry read again from %s: %d model(s), %d LoRA(s); models added: %s; removed: %s; changed: %s",
                self.path, len(registry.models), len(registry.loras),
                ", ".join(change.added) or "none", ", ".join(change.removed) or "none",
                ", ".join(change.changed) or "none",
            )
            return change

    def _digest(self) -> bytes | None:
        assert self.path is not None
        try:
            return hashlib.sha256(self.path.read_bytes()).digest()
        except OSError:
            return None
