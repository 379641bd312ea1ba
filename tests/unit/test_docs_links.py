"""Every relative link in README.md and docs/*.md names a file or folder that exists. Pages moved
between folders keep their text, and a link that was right at the top level needs `../` under docs/;
this catches the ones that were not fixed. Anchors (`#section`) are not checked."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# [text](target) and ![alt](target); the text may span lines. An optional title ("...") is dropped.
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# [label]: target, a reference-style definition on a line of its own.
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^\s*(```|~~~).*?^\s*\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`]*`")


def links(text: str) -> list[str]:
    """The link targets of a markdown text, outside code blocks and code spans."""
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    return INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith(("#", "/"))


def test_link_parser_sees_links_and_skips_code():
    text = ("See [a](docs/a.md#part) and ![b](img/b.png \"title\"), [c](https://x.org), [d\n"
            "over two lines](../d.md).\n`[e](e.md)`\n```\n[f](f.md)\n```\n[g]: g.md\n")
    assert links(text) == ["docs/a.md#part", "img/b.png", "https://x.org", "../d.md", "g.md"]
    assert [t for t in links(text) if is_relative(t)] == ["docs/a.md#part", "img/b.png", "../d.md", "g.md"]


def test_every_relative_link_resolves():
    broken, checked = [], 0
    for page in PAGES:
        for target in links(page.read_text()):
            if not is_relative(target):
                continue
            checked += 1
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert checked > 0, "no relative links found: the parser no longer matches the pages"
    assert broken == []
