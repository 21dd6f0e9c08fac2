"""API keys: the YAML file that declares them, and who a request's key says the caller is.

The file (``IMAGEN_API_KEYS_FILE``) holds no key, only each key's SHA-256::

    keys:
      - name: discord-bot
        sha256: 5c1f...e9        # hex SHA-256 of the key's UTF-8 text
        max_waiting: 5           # optional: overrides IMAGEN_KEY_MAX_WAITING for this key
        requests_per_minute: 60  # optional: overrides IMAGEN_KEY_REQUESTS_PER_MINUTE
      - name: ops
        sha256: 0b7a...41
        admin: true              # sees and cancels every key's jobs and files

``imagen keys add NAME [--admin]`` appends an entry and prints the new key once. A running server reads the
file again when it changes (checked at most once a second), so a new key works without a restart; a file
that no longer parses keeps the keys last read (and says why in the log).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("imagen.access")

KEY_PREFIX = "imk_"  # recognisable in a leaked config or a secret scanner
RELOAD_CHECK_S = 1.0


class KeyEntry(BaseModel):
    """One key as the file declares it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    admin: bool = False
    max_waiting: int | None = Field(None, ge=1)
    requests_per_minute: int | None = Field(None, ge=1)


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = []

    @classmethod
    def read(cls, path: Path) -> KeyFile:
        """Parse ``path``; a missing or empty file declares no key. Raises ``ValueError`` saying what is wrong."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        try:
            document = yaml.safe_load(text) or {}
            parsed = cls.model_validate(document)
        except (yaml.YAMLError, ValidationError) as exc:
            raise ValueError(f"{path}: not a valid API keys file: {exc}") from exc
        names = [entry.name for entry in parsed.keys]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"{path}: key names must be unique; repeated: {', '.join(duplicates)}")
        return parsed


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def add_key(path: Path, name: str, *, admin: bool = False) -> str:
    """Append a new key named ``name`` to the file (created if missing, mode 0600); return the key itself,
    which is stored nowhere. The entry is appended as text, so the file's comments stay; a file whose key
    list is not its last part is rewritten instead."""
    current = KeyFile.read(path)
    if any(entry.name == name for entry in current.keys):
        raise ValueError(f"a key named {name!r} exists already in {path}")
    key = new_key()
    entry = KeyEntry(name=name, sha256=key_digest(key), admin=admin)  # validates the name
    wanted = [*current.keys, entry]
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if not text.strip():
        text = "# API keys of imagen: names and SHA-256 digests only (`imagen keys add NAME`)\nkeys:\n"
    block = yaml.safe_dump([entry.model_dump(exclude_defaults=True)], sort_keys=False)
    text += "" if text.endswith("\n") else "\n"
    items = [line for line in text.splitlines() if line.lstrip().startswith("- ")]
    indent = " " * (len(items[-1]) - len(items[-1].lstrip())) if items else ""
    appended = text + "".join(indent + line + "\n" for line in block.splitlines())
    try:
        fits = KeyFile.model_validate(yaml.safe_load(appended)).keys == wanted
    except (yaml.YAMLError, ValidationError):
        fits = False
    if not fits:
        appended = yaml.safe_dump({"keys": [e.model_dump(exclude_defaults=True) for e in wanted]}, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(appended)
    os.replace(temporary, path)
    return key


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a key's name and what it may see. ``anyone`` when no keys are configured."""

    name: str
    admin: bool = False
    max_waiting: int | None = None  # None: no per-key limit
    requests_per_minute: int | None = None  # None: not rate limited

    def owns(self, key_name: str | None) -> bool:
        """May this caller see (and cancel) a job or file of ``key_name`` (None: made by no known job)?"""
        return self.admin or (key_name is not None and key_name == self.name)


ANYONE = Caller(name="", admin=True)  # no keys configured: today's behaviour, everything is everyone's


class KeyRing:
    """The keys of the file, read again when it changes; ``identify`` a presented key in constant time."""

    def __init__(self, path: Path, *, default_max_waiting: int, default_requests_per_minute: int) -> None:
        self.path = path
        self.default_max_waiting = default_max_waiting
        self.default_requests_per_minute = default_requests_per_minute
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked_at = 0.0
        self._callers: list[tuple[bytes, Caller]] = []
        if not path.is_file():
            raise ValueError(f"IMAGEN_API_KEYS_FILE={path} does not exist; create it with `imagen keys add NAME`")
        self._load(KeyFile.read(path))  # a broken file stops the start

    def __len__(self) -> int:
        return len(self._callers)

    def identify(self, presented: str) -> Caller | None:
        """The caller whose key is ``presented``, or None. Every entry is compared (``hmac.compare_digest``
        on digests), so the time taken says nothing about which key, or how much of it, matched."""
        self._reload_if_changed()
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: Caller | None = None
        for expected, caller in self._callers:
            if hmac.compare_digest(digest, expected):
                found = caller
        return found

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < RELOAD_CHECK_S:
            return
        with self._lock:
            if now - self._checked_at < RELOAD_CHECK_S:
                return
            self._checked_at = now
            try:
                stat = self.path.stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
                if stamp != self._stamp:
                    self._load(KeyFile.read(self.path), stamp)
                    log.info("API keys read again from %s: %d key(s)", self.path, len(self._callers))
            except (OSError, ValueError) as exc:
                log.error("API keys file unreadable, keeping the %d key(s) read before: %s", len(self._callers), exc)

    def _load(self, keys: KeyFile, stamp: tuple[int, int] | None = None) -> None:
        if stamp is None:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        self._callers = [
            (
                bytes.fromhex(entry.sha256),
                Caller(
                    name=entry.name,
                    admin=entry.admin,
                    max_waiting=entry.max_waiting or self.default_max_waiting,
                    requests_per_minute=entry.requests_per_minute or self.default_requests_per_minute,
                ),
            )
            for entry in keys.keys
        ]
        self._stamp = stamp
