"""``imagen`` command line: serve the API, run a distributed worker, manage API keys, write test fixtures,
list settings; and a client of a running server: generate, status, cancel, models, loras."""

from __future__ import annotations

import argparse
import base64
import logging
import sys
from pathlib import Path

from imagen.config import Settings


def _serve(args: argparse.Namespace) -> int:
    from imagen.api.app import create_app
    from imagen.api.http_server import serve
    from imagen.errors import ImagenError
    from imagen.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_format)
    try:
        app = create_app(settings)
    except ImagenError as exc:  # a damaged job database, a bad registry: what to do, not a traceback
        print(f"imagen serve: {exc}", file=sys.stderr)
        return 1
    serve(app, settings, host=args.host or settings.host, port=args.port or settings.port)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from imagen.jobs.distributed.worker import run_worker

    return run_worker(Settings(), gpu=args.gpu)


def _fixtures(args: argparse.Namespace) -> int:
    from imagen.testing.fixtures import write_fixtures

    registry = write_fixtures(Path(args.directory))
    print(f"wrote tiny random-weight fixtures; registry: {registry}")
    print(f"serve them with: IMAGEN_REGISTRY_PATH={registry} imagen serve")
    return 0


def _keys_file(args: argparse.Namespace) -> Path:
    path = Path(args.file) if args.file else Settings().api_keys_file
    if path is None:
        raise SystemExit("imagen keys: name the keys file with --file or IMAGEN_API_KEYS_FILE")
    return path


def _keys_add(args: argparse.Namespace) -> int:
    from imagen.access.keys import add_key

    path = _keys_file(args)
    try:
        key = add_key(path, args.name, admin=args.admin)
    except ValueError as exc:
        print(f"imagen keys add: {exc}", file=sys.stderr)
        return 1
    role = "admin key" if args.admin else "key"
    print(f"added {role} {args.name!r} to {path} (only its SHA-256 is stored).")
    print("Copy the key now: it is shown this once and cannot be recovered.")
    print(key)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from imagen.access.keys import KeyFile

    for entry in KeyFile.read(_keys_file(args)).keys:
        limits = ", ".join(
            f"{field}={value}"
            for field, value in (("max_waiting", entry.max_waiting), ("requests_per_minute", entry.requests_per_minute))
            if value is not None
        )
        print(entry.name + (" (admin)" if entry.admin else "") + (f" [{limits}]" if limits else ""))
    return 0


def settings_table() -> str:
    """Every setting as a Markdown table (tests/test_docs.py checks docs/configuration.md against it)."""
    lines = ["| Variable | Default | Description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default if field.default is not None else ""
        lines.append(f"| `IMAGEN_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(lines)


def _settings(args: argparse.Namespace) -> int:
    print(settings_table())
    return 0


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT (e.g. 1024x1024), not {text!r}")
    return int(width), int(height)


def _lora(text: str) -> dict[str, object]:
    name, sep, weight = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"expected ID[:WEIGHT], not {text!r}")
    if not sep:
        return {"name": name}
    try:
        return {"name": name, "weight": float(weight)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"the weight of {text!r} is not a number") from None


def _control(text: str) -> dict[str, object]:
    """``MODEL:IMAGE[:SCALE]``: a ControlNet unit whose control image is a local file (sent as a data URL)."""
    model, sep, rest = text.partition(":")
    if not model or not sep or not rest:
        raise argparse.ArgumentTypeError(f"expected MODEL:IMAGE[:SCALE], not {text!r}")
    unit: dict[str, object] = {"model": model}
    path, colon, scale = rest.rpartition(":")
    if colon:
        try:
            unit["scale"] = float(scale)
        except ValueError:
            path = rest  # a colon in the file's name, no scale
    else:
        path = rest
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read the control image {path!r}: {exc.strerror}") from None
    # the server reads the format from the bytes; the data URL's type is only a label
    unit["image"] = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return unit


def _hires(text: str) -> dict[str, object]:
    """``SCALE[:UPSCALER[:DENOISE]]``: the hires fix (``1.5``, ``2:latent``, ``2:ultrasharp:0.4``)."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 3:
        raise argparse.ArgumentTypeError(f"expected SCALE[:UPSCALER[:DENOISE]], not {text!r}")
    try:
        hires: dict[str, object] = {"scale": float(parts[0])}
        if len(parts) > 1 and parts[1]:
            hires["upscaler"] = parts[1]
        if len(parts) > 2:
            hires["denoise"] = float(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(f"the scale or denoise of {text!r} is not a number") from None
    return hires


def _refiner(text: str) -> dict[str, object] | None:
    """``MODEL[:SWITCH_AT]``, or ``none`` (no refiner, not even the model's default)."""
    if text.lower() == "none":
        return None
    model, sep, switch_at = text.partition(":")
    if not model:
        raise argparse.ArgumentTypeError(f"expected MODEL[:SWITCH_AT] or none, not {text!r}")
    try:
        return {"model": model, **({"switch_at": float(switch_at)} if sep else {})}
    except ValueError:
        raise argparse.ArgumentTypeError(f"the switch_at of {text!r} is not a number") from None


_NOT_GIVEN = object()


def _client(args: argparse.Namespace) -> int:
    from imagen.client import run

    options: dict[str, object] = {}
    if args.command == "generate":
        body: dict[str, object] = {"prompt": args.prompt, "num_images": args.n}
        optional = {"model": args.model, "steps": args.steps, "guidance_scale": args.cfg, "seed": args.seed,
                    "negative_prompt": args.negative, "scheduler": args.sampler}
        body.update({field: value for field, value in optional.items() if value is not None})
        if args.lora:
            body["loras"] = args.lora
        if args.control:
            body["controlnets"] = args.control
        if args.hires is not None:
            body["hires"] = args.hires
        if args.refiner is not _NOT_GIVEN:
            body["refiner"] = args.refiner
        if args.size is not None:
            body["width"], body["height"] = args.size
        options = {"body": body, "output": args.output}
    elif args.command in ("status", "cancel"):
        options = {"job_id": args.job_id}
    return run(args.command, args.url, args.key, **options)


def build_parser() -> argparse.ArgumentParser:
    """Every command and its options (tests check that the deployment files run only commands it accepts)."""
    parser = argparse.ArgumentParser(prog="imagen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the API (and, embedded, its generation workers)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.set_defaults(handler=_serve)

    worker = commands.add_parser("worker", help="run a Celery generation worker (distributed mode)")
    worker.add_argument("--gpu", default=None, help="CUDA device index this worker uses")
    worker.set_defaults(handler=_worker)

    fixtures = commands.add_parser("fixtures", help="write tiny random-weight models, LoRAs and a registry")
    fixtures.add_argument("directory")
    fixtures.set_defaults(handler=_fixtures)

    keys = commands.add_parser("keys", help="API keys: add one (printed once), list them")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    add = key_commands.add_parser("add", help="append a new key to the keys file and print it, once")
    add.add_argument("name", help="who the key is for (letters, digits, _ . @ -)")
    add.add_argument("--admin", action="store_true", help="the key sees and cancels every key's jobs and files")
    add.add_argument("--file", default=None, help="keys file (default: IMAGEN_API_KEYS_FILE)")
    add.set_defaults(handler=_keys_add)
    listing = key_commands.add_parser("list", help="the keys' names and limits (never the keys)")
    listing.add_argument("--file", default=None, help="keys file (default: IMAGEN_API_KEYS_FILE)")
    listing.set_defaults(handler=_keys_list)

    settings = commands.add_parser("settings", help="print every setting as a Markdown table")
    settings.set_defaults(handler=_settings)

    # -- the client of a running server ----------------------------------------------------------
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", default=None, help="the server (default: $IMAGEN_URL, else http://localhost:8009)")
    server.add_argument("--key", default=None, help="API key (default: $IMAGEN_API_KEY)")
    generate = commands.add_parser(
        "generate", parents=[server], help="generate image(s) on a server, with a progress bar; Ctrl-C cancels"
    )
    generate.add_argument("prompt")
    generate.add_argument("--model", default=None, help="model id (imagen models)")
    generate.add_argument("--lora", action="append", type=_lora, default=[], metavar="ID[:WEIGHT]",
                          help="a LoRA (imagen loras); repeat for several")
    generate.add_argument("--control", action="append", type=_control, default=[], metavar="MODEL:IMAGE[:SCALE]",
                          help="a ControlNet (imagen controlnets) guided by a control map file; repeat for several")
    generate.add_argument("--hires", type=_hires, default=None, metavar="SCALE[:UPSCALER[:DENOISE]]",
                          help="the hires fix: upscale (imagen upscalers) and denoise again")
    generate.add_argument("--refiner", type=_refiner, default=_NOT_GIVEN, metavar="MODEL[:SWITCH_AT]",
                          help="an SDXL refiner that finishes the picture; none: not even the model's default")
    generate.add_argument("--steps", type=int, default=None)
    generate.add_argument("--cfg", type=float, default=None, help="guidance scale")
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--negative", default=None, help="negative prompt")
    generate.add_argument("--sampler", default=None, help="an AUTOMATIC1111 sampler name (GET /schedulers)")
    generate.add_argument("--size", type=_size, default=None, metavar="WxH")
    generate.add_argument("-n", type=int, default=1, choices=range(1, 5), metavar="N", help="images, 1-4")
    generate.add_argument("-o", "--output", default=None,
                          help="file to write (several images: NAME-0.png, ...); default: the server's names")
    generate.set_defaults(handler=_client)
    for name, help_text in (("status", "a job's status"), ("cancel", "cancel a job")):
        command = commands.add_parser(name, parents=[server], help=help_text)
        command.add_argument("job_id")
        command.set_defaults(handler=_client)
    for name, help_text in (
        ("models", "the server's models"), ("loras", "the server's LoRAs"), ("controlnets", "the server's ControlNets"),
        ("upscalers", "the server's upscalers (for --hires)"),
    ):
        commands.add_parser(name, parents=[server], help=help_text).set_defaults(handler=_client)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.handler is not _client:  # the client's output is its own lines only
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
