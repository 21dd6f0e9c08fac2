"""API keys: the YAML file that declares them, and who a request's key says the caller is.

The file (``IMAGEN_API_KEYS_FILE``) holds no key, only each key's SHA-256::

    keys:
      - name: discord-bot
        sha256: 5c1f...e9        # hex SHA-256 of the key's UTF-8 text
        max_waiting: 5           # optional: overrides IMAGEN_KEY_MAX_WAITING for this key
        requests_per_minute: 60  # optional: overrides IMAGEN_KEY_REQUESTS_PER_MINUTE
        max_uploads: 10          # optional: overrides IMAGEN_KEY_MAX_UPLOADS
        max_upload_bytes: 50000000  # optional: overrides IMAGEN_KEY_MAX_UPLOAD_BYTES
      - name: ops
        sha256: 0b7a...41
        admin: true              # sees and cancels every key's jobs and files

``imagen keys add NAME [--admin]`` appends an entry and prints the new key once. A running server reads the
file again when it changes (checked once a second), so a new key works without a restart; a removed key
stops working, also when the file is deleted or the edit does not parse (``KeyRing`` says how).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imagen.watched_files import Complaints, LookSchedule

log = logging.getLogger("imagen.access")

KEY_PREFIX = "imk_"  # recognisable in a leaked config or a secret scanner


class KeyEntry(BaseModel):
    """One key as the file declares it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    admin: bool = False
    max_waiting: int | None = Field(None, ge=1)
    requests_per_minute: int | None = Field(None, ge=1)
    max_uploads: int | None = Field(None, ge=1)
    max_upload_bytes: int | None = Field(None, ge=1024)


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
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path: Path) -> KeyFile:
        """Parse the text of the file ``path``. Raises ``ValueError`` saying what is wrong."""
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
    # Live uploads this key may keep (count, bytes); None: the server's IMAGEN_KEY_MAX_UPLOADS / _BYTES.
    max_uploads: int | None = None
    max_upload_bytes: int | None = None

    def owns(self, key_name: str | None) -> bool:
        """May this caller see (and cancel) a job or file of ``key_name`` (None: made by no known job)?"""
        return self.admin or (key_name is not None and key_name == self.name)


ANYONE = Caller(name="", admin=True)  # no keys configured: today's behaviour, everything is everyone's


class KeyRing:
    """The keys of the file, and who a presented key says the caller is.

    ``identify`` reads memory only (it runs on the event loop, for every request). ``refresh`` reads the
    file: blocking I/O, so the middleware runs it in a thread, at most once per ``RELOAD_CHECK_S`` (when
    ``refresh_due`` says so). Each look hashes the whole content (the file is small): an edit that keeps
    the size and the modification time (``cp -p``, ``rsync -t``) is noticed too.

    What a look finds decides which keys work, failing closed for any key that may have been removed:

    - a file that parses: exactly its keys;
    - no file, or one that cannot be read: no key at all (every request is a 401) until it is back;
    - a file that does not parse: of the keys last read, those whose SHA-256 still appears in its text
      outside ``#`` comments keep working, with the rights last read; every other one stops at once (a
      revoking edit with a typo still revokes). New keys and changed rights wait until the file parses.

    The last two are logged at ERROR when they start, and again every ``COMPLAINT_REPEAT_S`` while they last.
    """

    def __init__(self, path: Path, *, default_max_waiting: int, default_requests_per_minute: int) -> None:
        self.path = path
        self.default_max_waiting = default_max_waiting
        self.default_requests_per_minute = default_requests_per_minute
        self._looks = LookSchedule()
        self._refresh_lock = threading.Lock()
        if not path.is_file():
            raise ValueError(f"IMAGEN_API_KEYS_FILE={path} does not exist; create it with `imagen keys add NAME`")
        content = path.read_bytes()
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not a valid API keys file: not UTF-8 text ({exc})") from exc
        # a broken file stops the start
        self._parsed: list[tuple[bytes, Caller]] = self._callers_of(KeyFile.parse(text, path))
        self._callers = self._parsed  # what ``identify`` serves now
        self._content_digest: bytes | None = hashlib.sha256(content).digest()
        self._complaints = Complaints(log)  # why fewer keys than the file's work now, while that lasts

    def __len__(self) -> int:
        return len(self._callers)

    def identify(self, presented: str) -> Caller | None:
        """The caller whose key is ``presented``, or None. Every entry is compared (``hmac.compare_digest``
        on digests), so the time taken says nothing about which key, or how much of it, matched."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: Caller | None = None
        for expected, caller in self._callers:
            if hmac.compare_digest(digest, expected):
                found = caller
        return found

    def refresh_due(self) -> bool:
        """True, to one caller per ``RELOAD_CHECK_S``, when the file should be looked at again."""
        return self._looks.due()

    def refresh(self) -> None:
        """Look at the file again and serve what it says (see the class). Blocking file I/O."""
        with self._refresh_lock:
            try:
                content = self.path.read_bytes()
            except OSError as exc:
                self._callers, self._content_digest = [], None
                self._complaints.complain(
                    f"API keys file {self.path} is gone or unreadable ({exc}): every API key is refused"
                )
                return
            digest = hashlib.sha256(content).digest()
            if digest == self._content_digest:
                self._complaints.repeat()
                return
            self._content_digest = digest
            try:
                parsed = self._callers_of(KeyFile.parse(content.decode("utf-8"), self.path))
            except ValueError as exc:  # UnicodeDecodeError included
                named = _outside_comments(content.decode("utf-8", "replace")).lower()
                self._callers = [(key, caller) for key, caller in self._parsed if key.hex() in named]
                kept = {caller.name for _, caller in self._callers}
                dropped = sorted(caller.name for _, caller in self._parsed if caller.name not in kept)
                self._complaints.complain(
                    f"API keys file {self.path} does not parse: only the {len(kept)} key(s) it still names work "
                    f"(as last read); refused now: {', '.join(dropped) or 'none'}. {exc}"
                )
                return
            self._parsed = self._callers = parsed
            self._complaints.clear()
            log.info("API keys read again from %s: %d key(s)", self.path, len(parsed))

    def _callers_of(self, keys: KeyFile) -> list[tuple[bytes, Caller]]:
        return [
            (
                bytes.fromhex(entry.sha256),
                Caller(
                    name=entry.name,
                    admin=entry.admin,
                    max_waiting=entry.max_waiting or self.default_max_waiting,
                    requests_per_minute=entry.requests_per_minute or self.default_requests_per_minute,
                    max_uploads=entry.max_uploads,
                    max_upload_bytes=entry.max_upload_bytes,
                ),
            )
            for entry in keys.keys
        ]


def _outside_comments(text: str) -> str:
    """The text without its ``#`` comments: no name or digest holds a ``#``, so cutting at the first one
    can only hide a key (which then stops working), never keep one that was commented out."""
    return "\n".join(line.partition("#")[0] for line in text.splitlines())
