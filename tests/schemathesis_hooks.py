"""Schemathesis hooks for the OpenAPI run (tests/test_openapi.py loads them through SCHEMATHESIS_HOOKS).

The document says everything about a valid request but one rule JSON Schema cannot express: each LoRA at
most once. Requests that name a LoRA twice are left out, so that "valid by the document" means "accepted".
(``filter_case``: the coverage phase applies it, not ``filter_body``.)
"""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    body = case.body
    if not isinstance(body, dict) or not isinstance(body.get("loras"), list):
        return True
    names = [repr(lora.get("name")) for lora in body["loras"] if isinstance(lora, dict)]
    return len(names) == len(set(names))
