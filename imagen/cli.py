"""``imagen`` command line: serve the API, run a distributed worker, write test fixtures, list settings."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from imagen.config import Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from imagen.api.app import create_app
    from imagen.logs import configure_logging, uvicorn_log_config

    settings = Settings()
    configure_logging(settings.log_format)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=args.host or settings.host,
        port=args.port or settings.port,
        log_level="info",
        log_config=uvicorn_log_config(),
    )
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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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

    settings = commands.add_parser("settings", help="print every setting as a Markdown table")
    settings.set_defaults(handler=_settings)

    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
