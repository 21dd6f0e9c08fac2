"""``imagen`` command line: serve the API, run a distributed worker, manage API keys, write test fixtures,
list settings."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from imagen.config import Settings


def _serve(args: argparse.Namespace) -> int:
    from imagen.api.app import create_app
    from imagen.api.http_server import serve
    from imagen.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_format)
    serve(create_app(settings), settings, host=args.host or settings.host, port=args.port or settings.port)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from imagen.jobs.distributed.worker import run_worker

    return run_worker(Settings(), gpu=args.gpu)


def _fixtures(args: argparse.Namespace) -> int:
    from imagen.devtools.fixtures import write_fixtures

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
    """Every setting as the README's Markdown table (tests/test_readme.py checks the README against it)."""
    lines = ["| Variable | Default | Description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default if field.default is not None else ""
        lines.append(f"| `IMAGEN_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(lines)


def _settings(args: argparse.Namespace) -> int:
    print(settings_table())
    return 0


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
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
