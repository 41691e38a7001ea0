"""One table renderer for the harnesses: the same rows on the console (rich) and in Markdown
results files, so `nslora demo` and `nslora compare` print and save tables one way; and the
verdict of a comparison in words, for the console and the HTML page alike."""

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


def verdict_lines(result: dict[str, Any]) -> list[str]:
    """The verdict in words: who wins, neurosymbolic's margin and interval, router accuracy."""
    v = result.get("verdict") or {}
    lines = []
    if v.get("winner"):
        lines.append(f"highest held-out accuracy: {v['winner']} ({v['winner_accuracy']:.3f})")
    elif v.get("tied"):
        lines.append(f"highest held-out accuracy: a tie between {', '.join(v['tied'])} "
                     f"({v['winner_accuracy']:.3f})")
    if "margin_points" in v:
        interval = v.get("margin_interval95_points")
        lines.append(f"neurosymbolic vs the best other arm ({v['best_other_arm']}): "
                     f"{v['margin_points']:+.1f} points" + (
                         f", 95 % paired bootstrap interval [{interval[0]:+.1f}, {interval[1]:+.1f}] "
                         f"over {v['seeds']} seed(s)" if interval else ""))
    if v.get("router_accuracy") is not None:
        ns = result["arms"]["neurosymbolic"]["router"]
        lines.append(f"router label accuracy: {v['router_accuracy']:.3f} over {ns['failures']} "
                     "labelled failures" + (f" (action agreement {ns['action_accuracy']:.3f})"
                                             if "action_accuracy" in ns else ""))
    return lines
