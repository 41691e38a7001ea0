"""Pages for `nslora compare` (the arms side by side) and `nslora sweep` (the arms across a mix of
weaknesses), rendered from the JSON those commands write, so a committed results file can be
turned into a page at any time."""

from __future__ import annotations

from typing import Any

from nslora_plugin.apps.report import plots
from nslora_plugin.apps.report.page import document, esc, image, kv_table, table

ARM_COLUMNS = (("accuracy", "held-out accuracy"), ("accuracy_sd", "sd over seeds"),
               ("fact_accuracy", "fact accuracy"), ("format_compliance", "format compliance"),
               ("reward", "reward"))


def _verdict(result: dict[str, Any]) -> str:
    """The verdict in the words `nslora compare` prints (one source for both)."""
    from nslora_plugin.apps.harness.tables import verdict_lines

    if not result.get("verdict"):
        return '<p class="muted">No verdict recorded.</p>'
    note = result.get("verdict_note")
    return "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in verdict_lines(result)) + "</ul>" + (
        f'<p class="muted">{esc(note)}</p>' if note else "")


def _interval_cell(held: dict[str, Any]) -> str | None:
    iv = held.get("accuracy_interval95")
    return f"[{iv['low']:.3f}, {iv['high']:.3f}] ({iv['levels_text']})" if iv else None


def _mix_cell(a: dict[str, Any]) -> str | None:
    mix = a.get("mix")
    if not mix:
        return None
    share = mix.get("pool_share") or 0.0
    measured = mix.get("pool_share_measured")
    return (f"{100 * share:.0f} %" + (f" (measured {100 * measured:.0f} %)" if measured is not None else "")
            + f" — {mix.get('how', '')}")


def _arms_table(result: dict[str, Any]) -> str:
    rows = []
    for arm, a in (result.get("arms") or {}).items():
        held = a.get("held_out") or {}
        gate = a.get("gate") or {}
        study = a.get("interventions") or {}
        agreement = (a.get("router") or {}).get("label_rule_agreement")
        rows.append([arm, *(held.get(k) for k, _ in ARM_COLUMNS), _interval_cell(held), _mix_cell(a),
                     a.get("edits_proposed"), a.get("edits_accepted"), gate.get("accepted_on_gain"),
                     gate.get("accepted_on_tie_break"), agreement,
                     study.get("label_accuracy_vs_interventions"), a.get("editor_calls"),
                     a.get("editor_tokens"), a.get("wall_seconds")])
    base = result.get("base") or {}
    if base:
        rows.append(["base (untouched)", *(base.get(k) for k, _ in ARM_COLUMNS),
                     *([None] * 13)])
    headers = ["arm", *(w for _, w in ARM_COLUMNS), "95 % interval (task seeds × seeds × items)",
               "pool mix", "edits proposed", "edits accepted", "accepted on a reward gain",
               "accepted on the tie-break", "router label/rule agreement (not accuracy)",
               "router vs interventions", "editor calls", "editor tokens", "wall seconds"]
    return table(headers, rows, numeric=[i for i in range(1, len(headers)) if i not in (6, 7)])


def _per_seed_table(result: dict[str, Any]) -> str:
    """Held-out accuracy per run: (task seed, training seed) in this version's `runs`, training
    seed in older files' `per_seed`."""
    arms = list(result.get("arms") or {})
    if result.get("runs"):
        flat = [(f"task seed {ts} · seed {s}", r) for ts, by_seed in result["runs"].items()
                for s, r in by_seed.items()]
    else:
        flat = [(f"seed {s}", r) for s, r in (result.get("per_seed") or {}).items()]
    if len(flat) < 2:
        return ""
    rows = [[name, *((runs.get(arm) or {}).get("held_out", {}).get("accuracy") for arm in arms)]
            for name, runs in flat]
    return "<h3>Held-out accuracy per run</h3>" + table(["run", *arms], rows, numeric=range(1, len(arms) + 1))


def _splits(result: dict[str, Any]) -> str:
    splits = result.get("splits") or {}
    if not splits:
        return ""
    rows = [(name, s.get("n", len(s.get("ids") or [])), ", ".join((s.get("ids") or [])[:4])
             + (" …" if len(s.get("ids") or []) > 4 else "")) for name, s in splits.items()]
    return "<h3>Splits</h3>" + table(["split", "rows", "first ids"], rows, numeric=(1,))


def compare_body(result: dict[str, Any]) -> str:
    """The arms side by side: the bar chart, the verdict, the table, the seeds and the splits."""
    return (image(plots.compare_png(result), "held-out accuracy per arm with per-seed points")
            + _verdict(result) + _arms_table(result) + _per_seed_table(result) + _splits(result))


def _setup(result: dict[str, Any]) -> str:
    task = {k: v for k, v in (result.get("task") or {}).items() if not isinstance(v, (list, dict))}
    settings = {k: v for k, v in (result.get("settings") or {}).items() if k != "nslora_config"}
    parts = [f"<pre>{esc(result.get('command', ''))}</pre>", "<h3>Task</h3>", kv_table(task.items()),
             "<h3>Settings</h3>", kv_table(settings.items()), "<h3>Machine</h3>",
             kv_table((result.get("machine") or {}).items())]
    if result.get("wall_seconds") is not None:
        parts.append(f"<p>wall time: {esc(result['wall_seconds'])} s</p>")
    return "".join(parts)


def sweep_body(sweep: dict[str, Any]) -> str:
    """The "when" sweep: accuracy against the mix, a table of mean ± sd [interval] per arm and
    mix, and the winner at each mix."""
    points = sweep.get("points") or []
    arms = list(sweep.get("arms") or [])
    headers = ["arm", *(f"facts/style {100 - 100 * p.get('style_share', 0):g}/{100 * p.get('style_share', 0):g}"
                        for p in points)]
    rows = []
    for arm in arms:
        cells = [arm]
        for p in points:
            s = p.get("arms", {}).get(arm) or {}
            lo, hi = (s.get("interval95") or [None, None])[:2]
            cells.append(f"{s.get('accuracy', float('nan')):.3f} ± {s.get('accuracy_sd', 0.0):.3f} "
                         + (f"[{lo:.3f}, {hi:.3f}]" if lo is not None else "")
                         + (f" ({s['levels']})" if s.get("levels") else ""))
        rows.append(cells)
    from nslora_plugin.apps.harness.tables import point_call

    winners = [(f"{100 * p.get('style_share', 0):g} %", point_call(p.get("verdict"))) for p in points]
    return (image(plots.sweep_png(sweep), "held-out accuracy against the share of style weaknesses")
            + table(headers, rows) + "<p class=\"muted\">held-out accuracy, mean ± sd over runs "
            "[95 % bootstrap interval] (the n of each level: task seeds × training seeds × held-out "
            "items; results files of older versions resampled held-out rows within each seed)</p>"
            + "<h3>Highest arm at each mix</h3>" + table(["style share", "highest (a tie when the "
                                                          "paired interval contains 0)"], winners))


def render_compare(result: dict[str, Any], sweep: dict[str, Any] | None = None) -> str:
    sections = [("arms", "Arms side by side", compare_body(result))]
    if sweep:
        sections.append(("sweep", "When: the sweep over the mix of weaknesses", sweep_body(sweep)))
    sections.append(("setup", "Command, task and machine", _setup(result)))
    task = (result.get("task") or {}).get("name", "")
    return document("nslora compare", f"task {task}" if task else "", sections)


def render_sweep(sweep: dict[str, Any]) -> str:
    sections = [("sweep", "When: the sweep over the mix of weaknesses", sweep_body(sweep))]
    for p in sweep.get("points") or []:
        result = p.get("result") or {}
        if result.get("arms"):
            share = p.get("style_share", 0)
            sections.append((f"mix-{share:g}", f"Arms at style share {100 * share:g} %", compare_body(result)))
    first = next((p.get("result") for p in sweep.get("points") or [] if p.get("result")), None)
    if first:
        sections.append(("setup", "Command, task and machine", _setup(first)))
    return document("nslora sweep", str(sweep.get("command", "")), sections)
