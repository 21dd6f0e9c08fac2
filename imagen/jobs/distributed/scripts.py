"""The Lua scripts (``lua/*.lua``) that make every state change of a job one atomic step in Redis.

The scripts hold no rule of their own: Python reads the record, asks :class:`imagen.jobs.lifecycle.AttemptPolicy`
for the verdict, and a script applies it under a guard (state, owner, attempts and lock still as read; else
it answers ``conflict`` and the caller reads again, up to ``CONFLICT_RETRIES`` times). After a script that may
have changed a job, the job's id goes out on ``keys.CHANGES_CHANNEL`` for the API processes' live streams.
"""

from __future__ import annotations

import logging
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import redis

from imagen.jobs.distributed.keys import CHANGES_CHANNEL, JOB_PREFIX

if TYPE_CHECKING:
    from redis.commands.core import Script

log = logging.getLogger("imagen.jobs")

SCRIPTS = (
    "submit", "confirm", "withdraw", "sweep_unconfirmed", "claim", "settle", "progress", "renew", "complete",
    "replica_beat", "release_png", "cancel", "index_queue",
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
    "sweep_unconfirmed": ["lib_unconfirmed"],
    "complete": ["lib_pngs"],
    "replica_beat": ["lib_pngs"],
    "release_png": ["lib_pngs"],
}
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
            source = "\n".join([*(lua_source(lib) for lib in _PRELUDES.get(name, [])), lua_source(name)])
            self._scripts[name] = client.register_script(source)

    def run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        answer = self._scripts[script](keys=keys, args=args)
        if script in CHANGING_SCRIPTS:
            # Even when the script changed nothing (a refused guard): a stream woken for nothing reads the
            # job, finds it as it was, and sends nothing. A lost notification only delays a stream (it reads
            # the job again within ``api.events.RESYNC_S``): never fail the write that was made for it.
            try:
                self.client.publish(CHANGES_CHANNEL, keys[0].removeprefix(JOB_PREFIX))
            except redis.RedisError as exc:
                log.debug("change of %s not published: %s", keys[0], exc)
        return answer


def reply_text(value: Any) -> str:
    """A script's status reply (bytes from Redis) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
