"""The web page's answers: a Content-Security-Policy the page lives within, and no framing by other sites.

(The browser tests, tests/test_web_page.py, fail on any CSP violation the page reports while they drive it.)
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from fastapi.testclient import TestClient

from imagen.api.web import STATIC_DIR


def policy(header: str) -> dict[str, set[str]]:
    directives = (part.strip().split() for part in header.split(";") if part.strip())
    return {name: set(values) for name, *values in directives}


def test_the_page_and_its_files_forbid_framing_and_foreign_or_inline_code(client: TestClient) -> None:
    for path in ("/", "/ui/app.js", "/ui/style.css"):
        answer = client.get(path)
        assert answer.status_code == 200, path
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["x-content-type-options"] == "nosniff"
        csp = policy(answer.headers["content-security-policy"])
        assert csp["frame-ancestors"] == {"'none'"}
        assert csp["default-src"] == {"'none'"}
        assert csp["script-src"] == csp["style-src"] == {"'self'"}
        assert csp["connect-src"] == {"'self'", "blob:"}  # this server, and the page's own object URLs
        assert not any("unsafe" in value for values in csp.values() for value in values)


class _Inline(HTMLParser):
    """What a CSP without 'unsafe-inline' would block in the page's markup."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "script" and "src" not in names:
            self.found.append("an inline <script>")
        if tag == "style":
            self.found.append("a <style> element")
        self.found += [f"{name}= on <{tag}>" for name in names if name == "style" or name.startswith("on")]
        self.found += [f"javascript: on <{tag}>" for _, value in attrs if (value or "").startswith("javascript:")]


def test_the_page_has_nothing_inline_that_its_policy_would_block() -> None:
    parser = _Inline()
    parser.feed((STATIC_DIR / "index.html").read_text())
    assert parser.found == []
    script = (STATIC_DIR / "app.js").read_text() + (STATIC_DIR / "i18n.js").read_text()
    assert not re.search(r"\beval\(|new Function\(|\.innerHTML\s*=|setAttribute\(\s*[\"']style", script)
