"""Generated sections of the docs: numbers in a doc come from the command that computes or measures them.

A section sits between two markers in the markdown (invisible when rendered):

    <!-- generated:memory.budget by `python -m benchmarks.memory --write-docs` -->
    ...rendered by the command...
    <!-- /generated:memory.budget -->

`update(path, sections)` rewrites the sections of a file; `stale(path, sections)` names those whose text differs
from what the command renders now (the tests call it, so a doc that disagrees with its tool fails them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

_SECTION = re.compile(r"(<!-- generated:(?P<name>[\w.\-]+)(?: by [^>]*)? -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)",
                      re.DOTALL)


def sections_in(text: str) -> dict[str, str]:
    """name -> body of every generated section of `text`."""
    return {m.group("name"): m.group("body") for m in _SECTION.finditer(text)}


def _body(content: str) -> str:
    return content.rstrip("\n") + "\n"


def render(text: str, sections: Mapping[str, str]) -> str:
    """`text` with the body of each named section replaced; a section the text lacks is an error."""
    missing = set(sections) - set(sections_in(text))
    if missing:
        raise KeyError(f"no generated section(s) {sorted(missing)} in the document: add their markers first")
    return _SECTION.sub(lambda m: m.group(1) + (_body(sections[m.group("name")]) if m.group("name") in sections
                                                 else m.group("body")) + m.group(4), text)


def stale(path: str | Path, sections: Mapping[str, str]) -> list[str]:
    """Names of the sections of `path` whose text is not what `sections` renders."""
    have = sections_in(Path(path).read_text(encoding="utf-8"))
    return sorted(name for name, content in sections.items() if have.get(name) != _body(content))


def update(path: str | Path, sections: Mapping[str, str]) -> list[str]:
    """Rewrite the sections of `path`; the names that changed."""
    path = Path(path)
    changed = stale(path, sections)
    if changed:
        path.write_text(render(path.read_text(encoding="utf-8"), sections), encoding="utf-8")
    return changed
