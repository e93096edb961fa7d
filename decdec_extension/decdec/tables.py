"""Plain-text tables for the scripts' terminal output (their JSON files hold the numbers)."""
from __future__ import annotations


def text_table(lines: list[tuple[str, ...]], left: tuple[int, ...] | range = ()) -> str:
    """Aligned columns, the first line a header underlined by dashes; the columns in ``left`` are
    left-aligned, the others right-aligned."""
    widths = [max(len(line[c]) for line in lines) for c in range(len(lines[0]))]
    out = ["  ".join(cell.ljust(w) if c in left else cell.rjust(w) for c, (cell, w) in enumerate(zip(line, widths))).rstrip()
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
