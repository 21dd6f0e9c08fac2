"""The Lua scripts (``lua/*.lua``) that make every state change of a job one atomic step in Redis.

The scripts hold no rule of their own: Python reads the record, asks :class:`imagen.jobs.lifecycle.AttemptPolicy`
for the verdict, and a script applies it under a guard (state, owner, attempts and lock still as read; else
it answers ``conflict`` and the caller reads again, up to ``CONFLICT_RETRIES`` times). A script that may change
a job announces the job's id on ``keys.CHANGES_CHANNEL`` itself, for the API processes' live streams.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import redis

from imagen.jobs.distributed.keys import CHANGES_CHANNEL, JOB_PREFIX

if TYPE_CHECKING:
    from redis.commands.core import Script

SCRIPTS = (
    "submit", "confirm", "withdraw", "sweep_unconfirmed", "claim", "settle", "progress", "renew", "complete",
    "replica_beat", "release_png", "cancel", "index_queue", "position", "add_totals",
    "next_waiting", "forget_expired_workers",
)  # fmt: skip
# The scripts that change a job's state or progress; their first key is the job's record.
CHANGING_SCRIPTS = frozenset({"confirm", "claim", "settle", "progress", "complete", "cancel"})
# The shared Lua functions each script needs, prepended to it.
_PRELUDES = {
    "submit": ["lib_unconfirmed"],
    "confirm": ["lib_queue"],
    "claim": ["lib_queue"],
    "cancel": ["lib_queue"],
    "settle": ["lib_queue"],
    "index_queue": ["lib_queue"],
    "position": ["lib_queue"],
    "sweep_unconfirmed": ["lib_unconfirmed"],
    "complete": ["lib_pngs"],
    "replica_beat": ["lib_pngs"],
    "release_png": ["lib_pngs"],
}
# Prepended to the scripts that change a job: its id goes out on CHANGES_CHANNEL, from inside the script (no
# round trip of its own). First, yet never early: the script runs whole before any listener's next command,
# so a stream woken by it reads the job as the script left it. Even when the script changed nothing (a
# refused guard): a stream woken for nothing reads the job, finds it as it was, and sends nothing.
_ANNOUNCE_CHANGE = (
    f"redis.call('PUBLISH', '{CHANGES_CHANNEL}', string.sub(KEYS[1], {len(JOB_PREFIX) + 1}))"
)
# A record changed between our read and our write (another worker, the reaper): read again, this many times.
CONFLICT_RETRIES = 5


@cache
def lua_source(name: str) -> str:
    """The text of ``lua/<name>.lua`` (package data)."""
    folder = resources.files("imagen.jobs.distributed") / "lua"
    return (folder / f"{name}.lua").read_text(encoding="utf-8")


class Scripts:
    """The scripts, registered on one client (each runs by its hash, loaded again after a Redis restart)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._scripts: dict[str, Script] = {}
        for name in SCRIPTS:
            preludes = [lua_source(lib) for lib in _PRELUDES.get(name, [])]
            if name in CHANGING_SCRIPTS:
                preludes.insert(0, _ANNOUNCE_CHANGE)
            self._scripts[name] = client.register_script("\n".join([*preludes, lua_source(name)]))

    def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return self._scripts[script](keys=keys, args=args)


def reply_text(value: Any) -> str:
    """A script's status reply (bytes from Redis) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
