"""Every relative link in the user documentation resolves: the file exists and, for a link to a
heading (``file.md#heading``), the heading exists (GitHub's anchor rules)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "SECURITY.md", "CONTRIBUTING.md"] + sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
#: Written separately (the heatmap explainer); a link to it may come before the file does.
MAY_BE_MISSING = {ROOT / "docs" / "heatmap.md"}

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    return _CODE.sub("", _FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """The anchors GitHub makes for the headings of a Markdown file."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for title in _HEADING.findall(_FENCE.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower().replace("`", "")).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(doc: Path) -> list[str]:
    """``target (why)`` for each relative link of ``doc`` that does not resolve."""
    text = doc.read_text(encoding="utf-8")
    bad: list[str] = []
    for target in _LINK.findall(_prose(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        path_part, _, fragment = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        if not dest.exists():
            if dest not in MAY_BE_MISSING:
                bad.append(f"{target} (no such file)")
            continue
        if fragment and dest.suffix == ".md" and fragment not in anchors(dest.read_text(encoding="utf-8")):
            bad.append(f"{target} (no heading #{fragment} in {dest.name})")
    return bad


def test_the_documents_exist() -> None:
    for name in ("README.md", "SECURITY.md", "CONTRIBUTING.md", "docs/conformance.md", "docs/architecture.md",
                 "docs/model-card.md", "docs/benchmarks.md"):
        assert (ROOT / name).is_file(), name


@pytest.mark.parametrize("name", DOCS)
def test_relative_links_resolve(name: str) -> None:
    assert broken_links(ROOT / name) == []


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# A title: with `code`\n\n## Twice\n\n## Twice\n", encoding="utf-8")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[ok](other.md) [ok](other.md#a-title-with-code) [ok](other.md#twice-1) [ok](#here) [web](https://x.org/y)\n"
        "[gone](missing.md) ![gone](img/none.png) [bad anchor](other.md#nowhere)\n"
        "`[not a link](nothing.md)`\n\n```\n[not a link](nothing.md)\n```\n\n## Here\n",
        encoding="utf-8")
    assert broken_links(doc) == ["missing.md (no such file)", "img/none.png (no such file)",
                                 "other.md#nowhere (no heading #nowhere in other.md)"]
