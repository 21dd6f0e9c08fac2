"""mkdocs hooks for the manual (mkdocs.yml names this file)."""

from __future__ import annotations

from typing import Any

# The reference (docs/imagen-api-v2.md) is kept byte for byte as it was given, and it links to three documents of
# the project it was written for, which this repository does not have. Only these links, only on that page.
REFERENCE = "imagen-api-v2.md"
ABSENT_DOCUMENTS = ("WORKFLOW.md", "CLAUDE.md", "API_UPDATES.md")


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """The reference's links to documents this repository does not have, as plain text."""
    if page.file.src_uri != REFERENCE:
        return markdown
    for name in ABSENT_DOCUMENTS:
        markdown = markdown.replace(f"[{name}]({name})", name)
    return markdown
