"""One table renderer for the harnesses: the same rows on the console (rich) and in Markdown
results files, so `nslora demo` and `nslora compare` print and save tables one way."""

from __future__ import annotations

from typing import Any, Sequence


def print_table(console: Any, title: str, columns: Sequence[str],
                rows: Sequence[Sequence[str]]) -> None:
    """The first column left-aligned (labels), the others right-aligned (numbers)."""
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "| " + " | ".join(columns) + " |\n|---|" + "---:|" * (len(columns) - 1)
    return "\n".join([head, *("| " + " | ".join(row) + " |" for row in rows)]) + "\n"
