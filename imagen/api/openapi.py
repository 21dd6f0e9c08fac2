"""The OpenAPI document, with this server's registry written into the request schema.

``schemas.py`` is static; which model and LoRA ids exist, how many LoRAs a request may name
(``IMAGEN_MAX_LORAS``), whether ``ip_strength`` > 0 can work and whether webhooks are on are known only at
start. Written into the
document, they make a request that the document says is valid one that the server accepts (the schemathesis
run in the tests holds the server to that). The one rule JSON Schema cannot say, each LoRA at most once,
stays in the description.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from imagen.config import Settings
from imagen.generation.samplers import available_samplers
from imagen.registry import Registry


def install_openapi(app: FastAPI, registry: Registry, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            _describe_this_server(document["components"]["schemas"], registry, settings)
            if settings.api_keys_file is not None:
                _require_keys(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise it


def _describe_this_server(schemas: dict[str, Any], registry: Registry, settings: Settings) -> None:
    request = schemas["GenerationRequest"]["properties"]
    request["prompt"]["pattern"] = r"\S"  # not blank
    model = next(choice for choice in request["model"]["anyOf"] if choice.get("type") == "string")
    model["enum"] = registry.model_ids
    request["loras"]["maxItems"] = min(settings.max_loras, len(registry.lora_ids))
    if registry.lora_ids:
        schemas["LoraRequest"]["properties"]["name"]["enum"] = registry.lora_ids
    adapter = registry.ip_adapter
    if adapter is None or not adapter.reference_image.is_file():
        request["ip_strength"]["maximum"] = 0.0
        request["ip_strength"]["description"] += " This server has no IP-Adapter: 0.0 only."
    if not settings.webhook_secret:
        request["webhook"]["anyOf"] = [{"type": "null"}]
        request["webhook"]["description"] += " This server has no IMAGEN_WEBHOOK_SECRET: null only."
    scheduler = next(choice for choice in request["scheduler"]["anyOf"] if choice.get("type") == "string")
    scheduler["enum"] = available_samplers()
    # Fields that go together (an image's content, and "width and height both non-null", JSON Schema cannot
    # say: the descriptions do).
    schemas["GenerationRequest"]["dependentRequired"] = {
        "width": ["height"], "height": ["width"], "mask_image": ["init_image"], "strength": ["init_image"],
    }  # fmt: skip


def _require_keys(document: dict[str, Any]) -> None:
    """With API keys on: every operation but ``/health`` needs one (Swagger UI's "Authorize" button), and
    may answer 401 (and 429: requests per minute)."""
    document["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <key>`"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    document["security"] = [{"bearer": []}, {"apiKey": []}]
    detail = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Detail"}}}}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            if path == "/health":
                operation["security"] = []
                continue
            operation["responses"].setdefault("401", {"description": "Missing or unknown API key.", **detail})
            operation["responses"].setdefault("429", {"description": "Too many requests for this key.", **detail})
