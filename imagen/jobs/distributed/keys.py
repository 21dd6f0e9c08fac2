"""The Redis keys of the distributed backend (the broker's own server): their layout, and their names.

Every state change of a job is one Lua script (``lua/*.lua``, run by ``scripts.py``), so it is atomic
across API replicas and workers. Which module reads and writes each key is named after it.

- ``imagen:job:{id}``  hash (``records.py``): state, task, output_name, key_name (the API key that submitted
  it), attempts, seq, owner, ticket (the id of the broker message that started the running attempt),
  progress, result, error, times.
  A finished record gets a Redis expiry of ``result_ttl_s``. A new record is *unconfirmed* (field
  ``unconfirmed``, expiry IMAGEN_BROKER_TIMEOUT_S) until its broker message is published: a submission
  that fails half-way (Redis stalled, publish failed, the API killed) leaves nothing behind.
- ``imagen:waiting``   sorted set of the PENDING job ids, scored by queue order: its size is the cluster-wide
  queue length checked by ``submit`` (check-and-add in one script, with the per-key waiting limit).
- The fair queue's index (``jobs.fairness``; kept by ``lua/lib_queue.lua`` in every script that moves a
  confirmed job in or out of the queue, so no call ever reads the whole queue):
  ``imagen:queue:{key_name}`` sorted set of the key's confirmed waiting job ids by queue order;
  ``imagen:queue_keys`` sorted set of the keys that have some, scored by ``fairness.key_rank`` (the next job
  is the oldest of the first key); ``imagen:queue_sizes`` hash key_name -> how many (a position reads it
  and ``queue_keys``, two reads whatever the queue's length). ``imagen:queue_indexed`` says the index was
  built (``lua/index_queue.lua`` builds it once from ``imagen:waiting`` in a Redis filled by an older version).
- ``imagen:key_turns`` hash key_name -> the turn at which the key was last served; ``imagen:turn`` the
  counter every claim increments (``lua/claim.lua`` records both).
- ``imagen:output_owners`` hash output_name -> key_name, written by ``submit`` (removed by ``withdraw``):
  it outlives the job record, as long as the image may be served.
- A job's input images (img2img, inpainting, IP-Adapter reference) are fields ``input:<role>`` of its record:
  they live and expire with it, and ``get`` never reads them (it names the fields it reads).
- ``imagen:upload:{id}`` hash (``uploads.py``): an image sent to ``POST /uploads``, as sent (field
  ``data``), with a Redis expiry at ``expires_at``. ``imagen:uploads_of:{key_name}`` sorted set (upload ids
  by ``expires_at``) and ``imagen:upload_sizes:{key_name}`` hash (upload id -> bytes) index the live uploads
  of a key for its quota (``types.UploadQuota``); expired ids leave them at the key's next upload, and both
  expire with its last.
- ``imagen:unconfirmed`` the waiting ids not confirmed yet (swept when their record expired).
- ``imagen:running``   set of the STARTED/PROGRESS job ids, scanned by the orphan reaper (``attempts.py``).
  A cancelled job (``lua/cancel.lua``) leaves the queue or this set at once, REVOKED: its worker learns it
  from its next progress write (``lua/progress.lua`` answers ``cancelled``), on whatever host it runs.
- ``imagen:lock:{id}`` the running attempt's owner token, with a short expiry its worker keeps renewing.
  A running job whose lock expired has a dead worker: it goes back to the queue (or fails). A claim is
  guarded by the record and its lock, so a job never runs twice at once. A broker message is a *ticket*
  (see ``task.py``): its worker claims the fair queue's next confirmed job, whichever job it names.
- ``imagen:png:{name}`` the PNG bytes of a finished job, ``imagen:outputs`` a stream of finished names
  (``pngs.py``). Each API replica copies the images into its own outputs folder (no shared disk), then adds
  itself to ``imagen:png_copies:{name}``; the PNG is deleted once every live replica (``imagen:replicas``,
  scored by heartbeat deadline) has a copy. A PNG no replica has copied never leaves Redis
  (``imagen:png_uncopied``, by age, and ``png_uncopied_bytes``); the first copy moves it to
  ``imagen:png_order`` and starts its expiry (``png_ttl_s``), for a live replica that does not copy it.
  ``imagen:png_sizes``/``png_bytes`` index them all: past ``png_redis_max_bytes`` the oldest copied ones go
  first, and while uncopied ones fill it, no new job is accepted or started (``pngs.Pngs.backlog_full``).
- ``imagen:worker:{host}:{pid}`` a worker's heartbeat (device info, busy, held models), with a short expiry, and
  ``imagen:workers`` the set of those keys (``workers.py``).
- ``imagen:model_orders:{host}:{pid}`` list: an operator's load and unload orders for that worker, pushed by
  an API replica, popped by the worker between jobs; it expires when no worker pops it (``model_orders.py``).
- ``imagen:stats`` hash: the job outcome totals (``jobs/stats.py``), ``HINCRBYFLOAT`` by the process that
  made the event (a worker, a reaper, an API replica), right after its script: ``/metrics`` reads them
  (``totals.py``).
- ``imagen:housekeeper`` which process runs the reconciler now (a short lease, ``workers.hold_lease``).
- ``imagen:changes`` a pub/sub channel: the id of each job a script may have changed, published right
  after the script (``scripts.Scripts.run``); each API process's listener wakes its live streams
  (``changes.py``). ``imagen:previews`` the workers' preview images, published and never stored.

One Redis server (not Redis Cluster): some scripts build key names from prefixes.
"""

from __future__ import annotations

PREFIX = "imagen:"
JOB_PREFIX = PREFIX + "job:"
PNG_PREFIX = PREFIX + "png:"
COPIES_PREFIX = PREFIX + "png_copies:"
WAITING = PREFIX + "waiting"
UNCONFIRMED = PREFIX + "unconfirmed"
RUNNING = PREFIX + "running"
SEQUENCE = PREFIX + "seq"
OUTPUT_OWNERS = PREFIX + "output_owners"
KEY_TURNS = PREFIX + "key_turns"
QUEUE_PREFIX = PREFIX + "queue:"
QUEUE_KEYS = PREFIX + "queue_keys"
QUEUE_SIZES = PREFIX + "queue_sizes"
QUEUE_INDEXED = PREFIX + "queue_indexed"
# The keys of the fair queue's index, as the scripts' ``queue_index`` (lib_queue.lua) takes them, after the
# queue prefix (an argument).
QUEUE_INDEX = [QUEUE_KEYS, QUEUE_SIZES, KEY_TURNS]
TURN = PREFIX + "turn"
OUTPUTS_STREAM = PREFIX + "outputs"
OUTPUTS_STREAM_MAXLEN = 10_000
PNG_SIZES = PREFIX + "png_sizes"
PNG_ORDER = PREFIX + "png_order"
PNG_BYTES = PREFIX + "png_bytes"
PNG_UNCOPIED = PREFIX + "png_uncopied"
PNG_UNCOPIED_BYTES = PREFIX + "png_uncopied_bytes"
# The keys of the PNG index, as the scripts' ``png_index`` (lib_pngs.lua) takes them after the two prefixes.
PNG_INDEX = [PNG_SIZES, PNG_ORDER, PNG_BYTES, PNG_UNCOPIED, PNG_UNCOPIED_BYTES]
REPLICAS = PREFIX + "replicas"
HOUSEKEEPER = PREFIX + "housekeeper"
STATS = PREFIX + "stats"
WORKERS = PREFIX + "workers"  # the keys of the heartbeats (workers.py)
CHANGES_CHANNEL = PREFIX + "changes"
# A job's preview images (GET /events?preview=1): "<job_id> <step> " then the JPEG bytes. Event-only: no key.
PREVIEWS_CHANNEL = PREFIX + "previews"


def job_key(job_id: str) -> str:
    return JOB_PREFIX + job_id


def upload_key(upload_id: str) -> str:
    return f"{PREFIX}upload:{upload_id}"


def uploads_index_key(key_name: str) -> str:
    return f"{PREFIX}uploads_of:{key_name}"


def upload_sizes_key(key_name: str) -> str:
    return f"{PREFIX}upload_sizes:{key_name}"


def queue_key(key_name: str) -> str:
    """The confirmed waiting jobs of one API key, by queue order."""
    return QUEUE_PREFIX + key_name


def lock_key(job_id: str) -> str:
    return f"{PREFIX}lock:{job_id}"


def png_key(output_name: str) -> str:
    return PNG_PREFIX + output_name


def copies_key(output_name: str) -> str:
    return COPIES_PREFIX + output_name


def worker_key(host: str, pid: int) -> str:
    return f"{PREFIX}worker:{host}:{pid}"


def model_orders_key(worker: str) -> str:
    """The orders of the worker named ``host:pid`` (as its heartbeat names it)."""
    return f"{PREFIX}model_orders:{worker}"
