"""Plain-text tables for the CLI."""

from __future__ import annotations

from collections.abc import Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, header: bool = True) -> str:
    cells = [[str(c) for c in row] for row in rows]
    all_rows = ([list(headers)] if header else []) + cells
    if not all_rows:
        return ""
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in all_rows
    ]
    return "\n".join(lines)
