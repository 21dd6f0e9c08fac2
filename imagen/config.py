"""All settings, read from ``IMAGEN_*`` environment variables (or a ``.env`` file).

Every field carries a description: the configuration page's table (docs/configuration.md) is generated from
them (``imagen settings``; ``tests/test_docs.py`` checks that the page's table matches).
"""

from __future__ import annotations

import base64
import binascii
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LORAS_PER_REQUEST_CAP = 8  # the most IMAGEN_MAX_LORAS may say; request bodies are cut at this length first
CONTROLNETS_PER_REQUEST_CAP = 8  # the same for IMAGEN_MAX_CONTROLNETS (each unit is a stored input image)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEN_", env_file=".env", extra="ignore")

    # --- HTTP -------------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Address the API listens on.")
    port: int = Field(8009, description="Port the API listens on.")
    public_url: str | None = Field(
        None,
        description="The server's address as clients reach it (`https://images.example.com`): the base of the "
        "absolute `url`s of OpenAI-style answers. Unset: from `X-Forwarded-Proto`/`X-Forwarded-Host`, else the "
        "request's own address.",
    )
    max_body_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        description="Largest request body the API reads (an image in a data URL or an upload included); a "
        "larger one gets 413 before more is read.",
    )
    upload_ttl_s: float = Field(
        3600.0, gt=0, description="Seconds an image sent to `POST /uploads` is kept for requests to name it."
    )
    keep_alive_s: float = Field(
        5.0,
        gt=0,
        description="Seconds an HTTP connection may stay idle, after a response or since it opened, or take to "
        "send a whole request head; then the server closes it (uvicorn `timeout_keep_alive`).",
    )
    max_header_line_bytes: int = Field(
        16 * 1024,
        ge=1024,
        description="Longest request line (method and URL) or header line a request may send; a longer one "
        "gets 431 and the connection is closed, before more is read.",
    )
    max_header_bytes: int = Field(
        64 * 1024,
        ge=4 * 1024,
        description="Largest request head (request line and all headers); a larger one gets 431 and the "
        "connection is closed, before more is read.",
    )
    max_headers: int = Field(
        100, ge=10, description="Most header lines a request may send; one more gets 431 and the connection is closed."
    )
    cors_origins: str | None = Field(
        None,
        description="Comma-separated origins that browsers may call the API from (`https://app.example.com`), "
        "or `*`. Unset: no CORS headers (browsers on other origins are refused).",
    )

    # --- running it for others: keys, limits, logs -----------------------------------------
    api_keys_file: Path | None = Field(
        None,
        description="YAML file of API keys (`imagen keys add NAME` writes it). Set: every route but `/health` "
        "needs `Authorization: Bearer <key>`, and each key sees only its own jobs. Unset: no key needed.",
    )
    key_max_waiting: int = Field(
        20,
        ge=1,
        description="With API keys: jobs one key may have waiting; beyond that 429 (a key's `max_waiting` "
        "overrides it). The global `IMAGEN_MAX_QUEUE` still answers 503.",
    )
    key_requests_per_minute: int = Field(
        300,
        ge=1,
        description="With API keys: requests per minute per key; beyond that 429 (a key's "
        "`requests_per_minute` overrides it).",
    )
    key_max_uploads: int = Field(
        32,
        ge=1,
        description="Images sent to `POST /uploads` that one key may have kept at once (until they expire); "
        "one more gets 429 (a key's `max_uploads` overrides it). Without keys: all callers together.",
    )
    key_max_upload_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Bytes of images sent to `POST /uploads` that one key may have kept at once (as sent; "
        "until they expire); past it 429, or 413 for one image larger than that (a key's "
        "`max_upload_bytes` overrides it). Without keys: all callers together.",
    )
    metrics_token: str | None = Field(
        None,
        min_length=16,
        description="A secret (16+ characters) that opens `GET /metrics` as `Authorization: Bearer <token>`, "
        "for a Prometheus scraper. Set, `/metrics` needs it (or an admin key). Unset: with keys, admin keys "
        "only; without, open.",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="`json`: one JSON object per log line (for log shippers); `text`: plain lines."
    )

    # --- files ------------------------------------------------------------------------------
    data_dir: Path = Field(Path("data"), description="Where the job database and the caches live.")
    outputs_dir: Path = Field(Path("outputs"), description="Where generated PNGs are written and served from.")
    outputs_max_age_s: float | None = Field(
        None,
        gt=0,
        description="Outputs retention: PNGs of the outputs folder older than this many seconds are deleted "
        "(then `/image`, `/download` and `/outputs` answer 404 for them). Unset: kept for ever.",
    )
    outputs_max_bytes: int | None = Field(
        None,
        gt=0,
        description="Outputs retention: past this many bytes of PNGs in the outputs folder, the oldest are "
        "deleted (the newest is always kept). Unset: no bound.",
    )
    outputs_sweep_s: float = Field(
        60.0, gt=0, description="How often the outputs retention (when set) looks at the outputs folder."
    )
    png_compress_level: int = Field(
        1, ge=0, le=9, description="zlib level of the PNGs: 1 is several times faster than 6 for ~10% more bytes."
    )
    registry_path: Path | None = Field(
        None,
        description="YAML file declaring models and LoRAs (see registry.example.yaml). "
        "Unset: the built-in demo model, its LoRA and its IP-Adapter.",
    )

    # --- job system -------------------------------------------------------------------------
    broker_url: str | None = Field(
        None,
        description="Unset: the embedded SQLite job system. `redis://host:6379/0`: Celery + Redis (distributed).",
    )
    max_queue: int = Field(100, ge=1, description="Jobs that may wait; beyond that POST /generate answers 503.")
    max_attempts: int = Field(
        3, ge=1, description="Attempts per job (first run included) on errors that may pass (OOM, dead worker)."
    )
    job_timeout_s: float = Field(600.0, gt=0, description="A job running longer than this fails with a timeout.")
    result_ttl_s: float = Field(3600.0, gt=0, description="Seconds /status and /image keep a finished job.")
    workers: int = Field(1, ge=1, description="Embedded: generation worker processes (one job at a time each).")
    affinity: bool = Field(
        True,
        description="Model affinity: a worker takes first the waiting jobs (of the key whose turn it is) for a "
        "model it already holds, and leaves a job to an idle worker that holds its model. Off: plain fair order.",
    )
    affinity_wait_s: float = Field(
        3.0,
        ge=0,
        le=300,
        description="Model affinity's bound: the longest a job waits for an idle worker that holds its model before "
        "any idle worker takes it (and loads the model), and how much later than a job another job of the same key "
        "may have been sent and still start before it, for a model a worker holds. 0: plain fair order.",
    )
    database_busy_timeout_s: float = Field(
        3.0,
        gt=0,
        description="Embedded: how long a request waits for the job database while another writer holds it "
        "(then 503 with Retry-After). Worker slots and webhooks wait up to 30 s.",
    )
    cancel_on_disconnect: bool = Field(
        True,
        description="Cancel the job of an OpenAI or AUTOMATIC1111 request whose client went away (or that the "
        "server's shutdown ended) before its image was answered: nobody else can fetch it.",
    )
    worker_gpu: str | None = Field(
        None,
        description="Distributed worker: CUDA device index it uses (sets `CUDA_VISIBLE_DEVICES`); "
        "same as `imagen worker --gpu N`. One worker per GPU.",
    )
    broker_timeout_s: float = Field(
        3.0,
        gt=0,
        le=60,
        description="Distributed: how long a request waits for Redis (each call, and a whole submission: record, "
        "broker message, confirmation) before answering 503. A submission not confirmed in this time is withdrawn, "
        "never run. Set it alike on API replicas and workers.",
    )
    job_lock_ttl_s: float = Field(
        30.0,
        gt=0,
        description="Distributed: a running job's lock, renewed by its worker every third of this; a worker "
        "silent for longer is taken as dead and the job goes back to the queue.",
    )
    broker_visibility_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="Distributed: seconds before Redis hands an unacknowledged message to another worker "
        "(a worker host that died). A job never runs twice at once either way.",
    )
    reconcile_after_s: float = Field(
        5.0,
        gt=0,
        description="Distributed: when, for this long, the broker holds fewer messages than confirmed waiting "
        "jobs (a publish lost, a message a worker took but could not use), the difference is published.",
    )
    png_ttl_s: float = Field(
        300.0,
        gt=0,
        description="Distributed: seconds Redis keeps a finished PNG after a first API replica copied it, for "
        "the other live replicas (it goes as soon as every one has a copy). A PNG no replica has copied never "
        "expires.",
    )
    png_redis_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="Distributed: bytes of finished PNGs Redis holds for the API replicas. Past it, copied ones "
        "go first (oldest first); while PNGs no replica has copied fill it, POST /generate answers 503 and "
        "workers start no job.",
    )

    # --- live progress (GET /events) ---------------------------------------------------------
    events_ping_s: float = Field(
        15.0, gt=0, description="Keep-alive comment interval of `GET /events` streams (seconds)."
    )
    preview_every_steps: int = Field(
        5,
        ge=1,
        description="`GET /events?preview=1`: a preview image every this many denoising steps.",
    )

    # --- webhooks ---------------------------------------------------------------------------
    webhook_secret: str | None = Field(
        None,
        description="Standard Webhooks signing secret, `whsec_` + base64 (at least 24 bytes). Unset: requests "
        "with a `webhook` are refused (422).",
    )
    webhook_allowed_hosts: str | None = Field(
        None,
        description="Comma-separated host names, addresses and networks (`hooks.example.com,10.0.0.0/8`) "
        "webhooks may be sent to, internal ones (loopback, private...) included; `*` adds any public host. "
        "Unset: any host whose addresses are public. Link-local and cloud-metadata addresses are never allowed.",
    )
    webhook_retry_s: float = Field(
        86400.0, gt=0, description="How long a `job.completed` webhook is retried after the job finished."
    )
    webhook_first_retry_s: float = Field(
        5.0, gt=0, description="Delay before the first retry of a webhook; it doubles (with jitter) up to 1 hour."
    )
    webhook_attempt_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="The whole of one webhook attempt (DNS, connection, request, the answer's headers), however "
        "slowly the receiver answers; then the attempt has failed.",
    )

    # --- generation -------------------------------------------------------------------------
    engine: str = Field(
        "diffusers",
        description="Generation engine: `diffusers` (real SDXL), `test-pattern` (no torch; a deterministic "
        "image after `test_pattern_seconds`), or `module:Class` for your own engine.",
    )
    test_pattern_seconds: float = Field(0.0, ge=0, description="Time the test-pattern engine takes per job.")
    test_pattern_load_seconds: float = Field(
        0.0,
        ge=0,
        description="Time the test-pattern engine takes to \"load\" a model it does not hold (it holds up to "
        "`max_loaded_models`, least recently used leaving first): to measure model switching without weights.",
    )
    default_model: str | None = Field(
        None, description="Model used when a request names none. Unset: `sdxl-base` if declared, else the first."
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="Where the diffusers engine runs.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto",
        description="Weights dtype of the diffusers engine. `auto`: float16 on CUDA, bfloat16 on CPUs "
        "with native bf16 (AVX512-BF16 / AMX), float32 otherwise.",
    )
    model_memory_gb: float | None = Field(
        None,
        gt=0,
        description="Memory (GiB) the models ready on the device may take per worker: GPU memory on CUDA, RAM "
        "on a CPU. Loading one more first frees (or moves to the RAM tier) the least recently used; a model larger "
        "than the budget still loads, alone. Unset: 75 % of the GPU's memory on CUDA, half of the RAM on a CPU.",
    )
    model_ram_gb: float = Field(
        0.0,
        ge=0,
        description="Second tier (GiB of host RAM) where models pushed off the device wait: switching back "
        "to one is a copy, not a read from disk. 0: off (a model pushed off is freed). On a CPU-only worker both "
        "tiers are RAM: this simply holds more models.",
    )
    max_loaded_models: int | None = Field(
        None,
        ge=1,
        description="Optional cap on how many models are ready on the device per worker, on top of "
        "`IMAGEN_MODEL_MEMORY_GB`. Unset: the memory budget alone decides.",
    )
    release_freed_models: bool = Field(
        True,
        description="After a model is freed: garbage collection, `torch.cuda.empty_cache` and glibc's "
        "`malloc_trim` give its memory back to the system. Off only to measure what they save.",
    )
    max_loras: int = Field(
        4, ge=0, le=LORAS_PER_REQUEST_CAP, description="Most LoRAs one request may apply at once."
    )
    max_output_pixels: int = Field(
        2048 * 2048,
        ge=64 * 64,
        le=8192 * 8192,
        description="The largest picture a job may make, in pixels: the hires fix's final size and POST /upscale's "
        "result stay within it (default 2048×2048).",
    )
    max_controlnets: int = Field(
        3, ge=0, le=CONTROLNETS_PER_REQUEST_CAP, description="Most ControlNets one request may apply at once."
    )
    cpu_offload: Literal["none", "model", "sequential"] = Field(
        "none",
        description="CUDA memory saving for 8-12 GB cards: `model` keeps each sub-model on the GPU only "
        "while it runs (small slowdown); `sequential` streams layer by layer (smallest memory, much slower).",
    )
    vae_tiling: bool = Field(False, description="Decode the image in tiles (less GPU memory when large).")
    vae_slicing: bool = Field(False, description="Decode a batch one image at a time (less GPU memory).")
    sdpa: bool = Field(
        True,
        description="UNet/VAE attention through PyTorch's scaled_dot_product_attention (`AttnProcessor2_0`). "
        "Off: diffusers' classic attention (slower, more memory; for debugging only).",
    )
    channels_last: bool = Field(
        True,
        description="UNet and ControlNet weights in channels_last (NHWC) layout, and the VAE's when at least 64 "
        "channels wide.",
    )
    fuse_qkv: bool = Field(
        True,
        description="Fused QKV projections in UNet and VAE attention (one matmul instead of three). The UNet "
        "uses them for jobs without LoRA / IP-Adapter; jobs with them run the unfused (LoRA-aware) path.",
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile the UNet (and VAE decoder). `auto`: on with CUDA, off on CPU (compiling "
        "SDXL takes many minutes on a small CPU for little gain). Skipped with CPU offload.",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "max-autotune-no-cudagraphs",
        description="torch.compile mode. `max-autotune*` compile longest (minutes; cached on disk), run fastest.",
    )
    compile_vae: bool = Field(True, description="With compile on: also compile the VAE decoder.")
    cpu_keep_freed_memory: bool = Field(
        True,
        description="CPU engine: the worker keeps the memory its tensors free for its next job (glibc malloc: "
        "no mmap per large block, no trim) instead of faulting it in afresh each time (a third of a 1024² demo "
        "job's CPU time); its resident memory then stays at its peak. No effect without glibc.",
    )
    compile_cache_dir: Path | None = Field(
        None,
        description="Where torch.compile keeps its caches (inductor FX graphs, autotuning, mega-cache) so a "
        "restart does not recompile from scratch. Unset: `<data_dir>/compile-cache`.",
    )
    warm_up_steps: int = Field(
        2,
        ge=0,
        description="At worker start: load the default model, then run one image of this many steps at its "
        "native size (compiles with compile on) so the first job is not the slow one. 0: load only.",
    )
    lora_hotswap: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Switch LoRAs on the UNet by copying weights into fixed adapter slots (diffusers/PEFT "
        "hotswap) instead of adding adapters: no recompilation. `auto`: on when compile is on.",
    )
    lora_hotswap_rank: int = Field(
        64,
        ge=1,
        description="With LoRA hotswap: slots are padded to this rank (extra compute per active LoRA); a "
        "LoRA of higher rank rebuilds its slot instead (correct, but the UNet recompiles).",
    )

    @field_validator("webhook_secret")
    @classmethod
    def _whsec_secret(cls, secret: str | None) -> str | None:
        if secret is None:
            return None
        try:
            key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except binascii.Error:
            key = b""
        if not secret.startswith("whsec_") or len(key) < 24:
            raise ValueError(
                "IMAGEN_WEBHOOK_SECRET must be `whsec_` followed by at least 24 bytes in base64, e.g. "
                "python -c \"import base64,os; print('whsec_'+base64.b64encode(os.urandom(32)).decode())\""
            )
        return secret

    @property
    def database_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"


@lru_cache
def get_settings() -> Settings:
    return Settings()
