"""The OpenAPI document, with this server's registry written into the request schemas.

``schemas.py`` is static; which model and LoRA ids exist, how many LoRAs a request may name
(``IMAGEN_MAX_LORAS``), whether ``ip_strength`` > 0 can work and whether webhooks are on are known only at
start. Written into the document (for the OpenAI and AUTOMATIC1111 bodies too: their model names, samplers and
checkpoints), they make a request that the document says is valid one that the server accepts (the
schemathesis run in the tests holds the server to that, on every route). The one rule JSON Schema cannot say,
each LoRA at most once, stays in the description. The document is written again when the registry file
changes (``imagen.registry.watch``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from imagen.api.a1111_compat import SCHEDULE_TYPES, request_schemas
from imagen.api.openai_compat import OPENAI_MODEL_NAMES
from imagen.api.schemas import NOT_BLANK
from imagen.config import Settings
from imagen.generation.samplers import available_samplers
from imagen.registry import Registry


def install_openapi(app: FastAPI, current_registry: Callable[[], Registry], settings: Settings) -> None:
    """``current_registry``: the registry served now; the document is written again when it changes (the
    registry file was edited: ``imagen.registry.watch``)."""
    written_for: list[Registry] = []  # the registry the cached document describes

    def openapi() -> dict[str, Any]:
        registry = current_registry()
        if app.openapi_schema is None or not written_for or written_for[0] is not registry:
            # a copy: FastAPI puts the routes' own dicts (openapi_extra) in the document, and each app patches its own
            document = copy.deepcopy(
                get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            )
            document["components"]["schemas"].update(request_schemas())  # the A1111 bodies
            _describe_this_server(document["components"]["schemas"], registry, settings)
            _describe_compat_bodies(document, registry, settings)
            _body_answers(document)
            if settings.api_keys_file is not None:
                _require_keys(document)
            app.openapi_schema = document
            written_for[:] = [registry]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise it


def _describe_this_server(schemas: dict[str, Any], registry: Registry, settings: Settings) -> None:
    request = schemas["GenerationRequest"]["properties"]
    request["prompt"]["pattern"] = NOT_BLANK
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


def _describe_compat_bodies(document: dict[str, Any], registry: Registry, settings: Settings) -> None:
    """The same for the OpenAI and AUTOMATIC1111 bodies: the ids, samplers and limits a request may name."""
    samplers = available_samplers()
    paths, schemas = document["paths"], document["components"]["schemas"]
    openai_bodies = [
        paths["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"],
        paths["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"],
    ]
    for body in openai_bodies:
        fields = body["properties"]
        fields["prompt"]["pattern"] = NOT_BLANK
        _choices(fields["model"], [*OPENAI_MODEL_NAMES, *registry.model_ids])
        if "scheduler" in fields:
            _choices(fields["scheduler"], samplers)
            fields["loras"]["maxItems"] = min(settings.max_loras, len(registry.lora_ids))
    for name in ("Txt2ImgRequest", "Img2ImgRequest"):
        fields = schemas[name]["properties"]
        fields["prompt"]["pattern"] = NOT_BLANK
        _choices(fields["sampler_name"], ["", *samplers])
        _choices(fields["sampler_index"], ["", *samplers])
        _choices(fields["scheduler"], ["", *SCHEDULE_TYPES, *(name.lower() for name in SCHEDULE_TYPES)])
        schemas[name]["dependentRequired"] = {"width": ["height"], "height": ["width"]}
    _choices(schemas["OverrideSettings"]["properties"]["sd_model_checkpoint"], registry.model_ids)


def _choices(field: dict[str, Any], values: list[str]) -> None:
    """A string field (or "string or null") as one of ``values``."""
    string = next((choice for choice in field.get("anyOf", []) if choice.get("type") == "string"), field)
    string["enum"] = values


def _body_answers(document: dict[str, Any]) -> None:
    """Every route with a body may answer 413 (the body limit, before any route runs), and those whose body
    FastAPI reads (not the OpenAI and A1111 ones, which answer in their own shapes) 400 for one it cannot."""
    detail = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Detail"}}}}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            if "requestBody" not in operation:
                continue
            responses = operation["responses"]
            responses.setdefault("413", {"description": "Body larger than IMAGEN_MAX_BODY_BYTES.", **detail})
            if not path.startswith(("/v1/", "/sdapi/")):
                responses.setdefault("400", {
                    "description": "A body that cannot be read: not UTF-8, JSON nested too deep, a broken form.",
                    **detail,
                })  # fmt: skip


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
            responses = operation["responses"]
            responses.setdefault("401", {"description": "Missing or unknown API key.", **detail})
            if "429" not in responses:
                responses["429"] = {"description": "Too many requests for this key.", **detail}
            elif responses["429"].get("content") != detail["content"]:  # the route's own 429 (OpenAI's, A1111's)
                content = responses["429"]["content"]["application/json"]
                content["schema"] = {"anyOf": [content["schema"], detail["content"]["application/json"]["schema"]]}
                responses["429"]["description"] += " Or too many requests for this key (`detail`)."
