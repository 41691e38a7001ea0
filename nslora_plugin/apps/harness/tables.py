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
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "| " + " | ".join(columns) + " |\n|---|" + "---:|" * (len(columns) - 1)
    return "\n".join([head, *("| " + " | ".join(row) + " |" for row in rows)]) + "\n"


def _interval(points: list[float], levels: str | None) -> str:
    return f"95 % interval [{points[0]:+.1f}, {points[1]:+.1f}]" + (f" ({levels})" if levels else "")


def _call(m: dict[str, Any]) -> str:
    return "a tie (the interval contains 0)" if m.get("call") == "tie" else str(m.get("call", ""))


def verdict_lines(result: dict[str, Any]) -> list[str]:
    """The verdict in words: the highest arm and whether the data separate it from the
    runner-up, neurosymbolic's margin with its interval and the n of each level, what the
    tie-break is worth, and the router (label/rule agreement; against interventions). Reads the
    results of this version and older ones (`seeds`, `router_accuracy`)."""
    v = result.get("verdict") or {}
    lines = []
    top = v.get("top_vs_runner_up")
    if v.get("winner"):
        line = f"highest held-out accuracy: {v['winner']} ({v['winner_accuracy']:.3f})"
        if top and top.get("arms", [None])[0] == v["winner"]:
            line += (f"; vs {top['arms'][1]}: {top['points']:+.1f} points, "
                     f"{_interval(top['interval95_points'], top.get('levels'))} — {_call(top)}")
        lines.append(line)
    elif v.get("tied"):
        lines.append(f"highest held-out accuracy: a tie between {', '.join(v['tied'])} "
                     f"({v['winner_accuracy']:.3f})")
    if "margin_points" in v:
        interval = v.get("margin_interval95_points")
        if interval and v.get("margin_levels"):
            detail = (f", {_interval(interval, v['margin_levels'])} — "
                      f"{_call({'call': v.get('margin_call')})}")
        elif interval:  # an older results file: a within-seed interval
            detail = (f", 95 % paired bootstrap interval [{interval[0]:+.1f}, {interval[1]:+.1f}] "
                      f"over {v.get('seeds', '?')} seed(s) (held-out rows resampled within each seed)")
        else:
            detail = ""
        lines.append(f"neurosymbolic vs the best other arm ({v['best_other_arm']}): "
                     f"{v['margin_points']:+.1f} points" + detail)
    for other, m in (v.get("margins") or {}).items():
        if other == v.get("best_other_arm"):
            continue
        lines.append(f"neurosymbolic vs {other}: {m['points']:+.1f} points, "
                     f"{_interval(m['interval95_points'], m.get('levels'))} — {_call(m)}")
    tie = v.get("tie_break_effect")
    if tie:
        lines.append(f"tie-break acceptances (neurosymbolic − neurosymbolic_strict, which rejects "
                     f"ties): {tie['points']:+.1f} points, "
                     f"{_interval(tie['interval95_points'], tie.get('levels'))} — {_call(tie)}")
    for arm, a in (result.get("arms") or {}).items():
        gate = a.get("gate")
        if gate and a.get("edits_proposed"):
            lines.append(f"{arm}: edits accepted on a reward gain {gate.get('accepted_on_gain', 0)}, "
                         f"on the tie-break {gate.get('accepted_on_tie_break', 0)}"
                         + (f", without a gain (negative margin) {gate['accepted_without_gain']}"
                            if gate.get("accepted_without_gain") else "")
                         + f"; rejected {gate.get('rejected', 0)}")
    agreement = v.get("router_label_rule_agreement")
    if agreement is not None:
        ns = result["arms"]["neurosymbolic"]["router"]
        lines.append(f"router label/rule agreement: {agreement:.3f} over {ns['failures']} labelled "
                     "failures (agreement, not accuracy: the task's rule reads the router's own "
                     "features)" + (f"; action/rule agreement {ns['action_rule_agreement']:.3f}"
                                    if ns.get("action_rule_agreement") is not None else ""))
    elif v.get("router_accuracy") is not None:  # an older results file
        lines.append(f"router label/rule agreement (recorded as 'router accuracy' by an older "
                     f"version): {v['router_accuracy']:.3f}")
    return lines


def intervention_lines(arm: str, a: dict[str, Any]) -> list[str]:
    """The router against interventions for one arm: the confusion matrix in words."""
    study = a.get("interventions")
    if not study:
        return []
    if not study.get("failures"):
        return [f"{arm} router vs interventions: no failure at a check to branch on"]
    acc = study.get("label_accuracy_vs_interventions")
    truth = study.get("truth_counts") or {}
    conf = study.get("confusion_truth_by_label") or {}
    matrix = "; ".join(f"truth {t}: labelled numerical {row.get('numerical', 0)}, symbolic "
                       f"{row.get('symbolic', 0)}" for t, row in conf.items() if any(row.values()))
    return [f"{arm} router vs interventions (branch at each check: candidate prompt alone; "
            f"{study.get('k_steps')} LoRA steps; both): "
            + (f"labels right on {study['label_right']} of {study['single_update_failures']} "
               f"failures one update fixes ({acc:.3f})" if acc is not None else
               "no failure that a single update fixes")
            + f"; truth over {study['failures']} failures: "
            + ", ".join(f"{k} {n}" for k, n in truth.items())
            + (f"; {matrix}" if matrix else "")
            + f"; prompt candidates: {', '.join(study.get('candidate_sources') or ['none'])}"]


def point_call(verdict: dict[str, Any] | None) -> str:
    """The highest arm at one mix, or a tie when the interval against the runner-up contains 0."""
    v = verdict or {}
    top = v.get("top_vs_runner_up")
    if v.get("tied"):
        return "tie: " + " = ".join(v["tied"])
    if top and top.get("call") == "tie":
        return (f"tie: {top['arms'][0]} {top['points']:+.1f} points over {top['arms'][1]}, "
                f"interval [{top['interval95_points'][0]:+.1f}, {top['interval95_points'][1]:+.1f}]")
    if top:
        return f"{top['call']} of {top['arms'][1]} ({top['points']:+.1f} points)"
    return v.get("winner") or "–"
