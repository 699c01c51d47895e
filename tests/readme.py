"""Read README.md as the tests need it: a section by its heading, its fenced blocks, its tables."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def section(heading: str, text: str | None = None) -> str:
    """Return the section under the heading (any level) up to the next heading of the same or a higher level."""
    text = README.read_text() if text is None else text
    match = re.search(rf"^(#+) {re.escape(heading)}\n", text, re.M)
    assert match, f"README.md has no heading {heading!r}"
    level = len(match.group(1))
    rest = text[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", _without_fences(rest), re.M)
    return rest[:end.start()] if end else rest


def _without_fences(text: str) -> str:
    """Blank out fenced blocks (keeping offsets), so a '# comment' in a code block is not a heading."""
    return re.sub(r"^```.*?^```", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.M | re.S)


def blocks(text: str, language: str) -> list[str]:
    """Return the fenced blocks of one language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def table(text: str, first_header: str) -> list[list[str]]:
    """Return the rows (cells stripped) of the first table whose first header cell is first_header."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and _cells(line)[0] == first_header:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(_cells(row))
            return rows
    raise AssertionError(f"README.md has no table headed {first_header!r}")


def _cells(line: str) -> list[str]:
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
