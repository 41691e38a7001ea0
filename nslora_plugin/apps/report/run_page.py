"""The run report: one page per run with what a practitioner looks for after training — how the
probe moved, where the router switched and why, which prompts the gate took or refused, what the
editor cost, what data was added, and what the run was configured and installed with."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from nslora_plugin.core.artifacts import package_versions
from nslora_plugin.apps.report import plots
from nslora_plugin.apps.report.data import METRIC_NAMES, RunData
from nslora_plugin.apps.report.page import badge, document, esc, fmt, image, kv_table, table
from nslora_plugin.apps.report.worddiff import word_diff

#: the page's sections, in order: (id, title); tests look for these ids
SECTIONS = (("overview", "Overview"), ("timeline", "Timeline"), ("prompts", "Prompt history"),
            ("router", "Router"), ("editor", "Editor usage and budget"),
            ("data", "Prompts as data"), ("config", "Configuration and versions"))

USAGE_ROWS = (("calls", "LLM calls answered"), ("failed_calls", "failed calls"),
              ("retried_calls", "retried calls"), ("cached_calls", "answered from the cache"),
              ("estimated_calls", "calls with estimated tokens"), ("prompt_tokens", "prompt tokens"),
              ("completion_tokens", "completion tokens"), ("total_tokens", "tokens in all"),
              ("seconds", "seconds in calls (summed)"), ("wall_seconds", "editor wall seconds"),
              ("rounds", "editor rounds"), ("health_checks", "health checks"))


def _count(value: Any) -> Any:
    """A count stored as a float (router scores are floats) shown as an integer."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _pairs(values: dict[str, Any]) -> str:
    return " · ".join(f"{k} {v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool)
                      else f"{k} {v}" for k, v in values.items())


def _card(value: Any, label: str) -> str:
    return f'<div class="card"><b>{fmt(value, 2)}</b><span>{esc(label)}</span></div>'


def _before_after(summary: dict[str, Any], first: dict[str, Any], last: dict[str, Any]) -> str:
    before = summary.get("probe_before") or first
    after = summary.get("probe_after") or last
    columns: list[tuple[str, dict[str, Any]]] = [("probe before", before)]
    plain = (summary.get("plain_lora") or {}).get("held_out")
    if summary.get("held_out_before"):
        columns.append(("held-out before", summary["held_out_before"]))
    if plain:
        columns.append(("held-out, plain LoRA", plain))
    columns.append(("probe after", after))
    if summary.get("held_out_after"):
        columns.append(("held-out after", summary["held_out_after"]))
    keys = [k for k in ("reward", "correctness", "format", "length", "json", "ref_nll", "failures", "n")
            if any(k in c for _, c in columns)]
    rows = [[METRIC_NAMES.get(k, k if k != "n" else "examples")] + [c.get(k) for _, c in columns] for k in keys]
    return table(["measure", *(name for name, _ in columns)], rows, numeric=range(1, len(columns) + 1))


def training_rows_line(summary: dict[str, Any]) -> str:
    """How many training rows carried the final prompt (the summary's `training_rows`)."""
    reach = summary.get("training_rows") or {}
    if "rows_carrying_initial_prompt" not in reach:
        return "not read (the run's rows were not read at train start)"
    read, total = reach.get("rows_read", 0), reach.get("rows", 0)
    text = (f"{reach['rows_carrying_initial_prompt']} of {read} rows read"
            + (f" (a sample of {total})" if read < total else "")
            + f"; initial prompt from {reach.get('initial_prompt_from', '?')}")
    if "examples_with_final_prompt" in reach:
        text += (f"; {reach['examples_with_final_prompt']} of {reach.get('examples_collated', 0)} "
                 f"examples collated carried the final prompt (version "
                 f"{reach.get('final_prompt_version', 0)}) in their tokens")
    return text


def overview(run: RunData) -> str:
    s, arts = run.summary, run.arts
    counts = run.decision_counts()
    usage = run.usage()
    first = arts.probe_reports[0] if arts.probe_reports else {}
    last = arts.probe_reports[-1] if arts.probe_reports else {}
    steps = s.get("steps", max([c.step for c in run.checks()] + [0]))
    cards = [_card(steps, "optimizer steps"),
             _card(counts.get("numerical", 0), "numerical checks"),
             _card(counts.get("symbolic", 0), "symbolic rounds"),
             _card(f"{counts.get('accepted', 0)} / {counts.get('rejected', 0)}", "edits accepted / rejected"),
             _card(arts.prompt_version, "prompt version"),
             _card(len(arts.augmented_rows), "prompts-as-data rows"),
             _card(usage.get("calls", 0), "editor LLM calls"),
             _card(len(run.faults()), "editor faults")]
    parts = [f'<div class="cards">{"".join(cards)}</div>']
    if not s:
        parts.append('<p class="note">This run has no summary.json yet: it had not finished when these '
                     f'artifacts were written; the numbers go up to step {esc(steps)}.</p>')
    parts.append(_before_after(s, first, last))
    parts.append("<h3>System prompt at the end</h3>")
    parts.append(f'<div class="prompt">{esc(arts.system_prompt)}</div>')
    if arts.initial_system_prompt != arts.system_prompt:
        parts.append("<h3>Against the initial prompt</h3>")
        parts.append(f'<div class="prompt">{word_diff(arts.initial_system_prompt or "", arts.system_prompt or "")}</div>')
    wall = s.get("wall_seconds")
    facts = [("training rows carrying the prompt", training_rows_line(s)),
             ("artifacts", str(arts.root)), ("training loss from", run.train_log_source or "not found"),
             ("wall seconds of the run", f"{wall:.1f}" if isinstance(wall, (int, float)) else None),
             ("report written", time.strftime("%Y-%m-%d %H:%M:%S"))]
    parts.append(kv_table(facts))
    return "".join(parts)


def timeline(run: RunData) -> str:
    parts = [image(plots.timeline_png(run), "timeline: training loss, C1 and C2, probe metrics and decisions"),
             '<p class="muted">Vertical lines: every check (grey: numerical, purple: symbolic round), '
             'dashed green: an accepted edit. C1 is the relative change of the windowed loss, C2 the '
             'windowed mean gradient norm of the LoRA parameters; the router calls training saturated '
             'when both are under their thresholds for a few checks.</p>']
    rows = [(c.step, badge(c.action), c.loss, c.c1, c.c2, _count(c.scores.get("failures")),
             c.scores.get("style_share"), esc(c.reason)) for c in run.checks()]
    parts.append("<h3>Checks</h3>")
    parts.append(table(["step", "decision", "windowed loss", "C1", "C2", "failures", "style share", "reason"],
                       rows, numeric=(0, 2, 3, 4, 5, 6), raw=(1, 7)))
    return "".join(parts)


def prompts(run: RunData) -> str:
    candidates = run.candidates()
    if not candidates:
        return ('<p class="muted">No candidate prompt was proposed: every check kept training the '
                'adapter.</p>')
    rows = [(c.index, c.step, c.editor, badge("accepted" if c.accepted else "rejected"),
             c.reward_before, c.reward_after, c.version) for c in candidates]
    parts = [table(["#", "step", "editor", "gate", "reward before", "reward after", "version"], rows,
                   numeric=(0, 1, 4, 5, 6), raw=(3,))]
    for c in candidates:
        verdict = badge("accepted" if c.accepted else "rejected")
        components = ", ".join(f"{METRIC_NAMES.get(k, k)} {v:.3f}" for k, v in sorted(c.components_after.items())
                               if isinstance(v, (int, float)))
        parts.append(
            f'<div class="candidate" id="candidate-{c.index}"><h3>#{c.index} · step {c.step} · '
            f'{esc(c.editor)} {verdict}</h3>'
            f"<p><b>Gate:</b> {esc(c.reason)}</p>"
            + (f"<p><b>Probe under this candidate:</b> {esc(components)}</p>" if components else "")
            + (f"<details><summary>editor's rationale</summary><pre>{esc(c.rationale)}</pre></details>"
               if c.rationale else "")
            + ("<p class=\"muted\">Word diff against the prompt it would replace "
               "(<del>removed</del>, <ins>added</ins>):</p>" if c.prompt != c.replaces else
               "<p class=\"muted\">No change: the candidate is the prompt it would replace.</p>")
            + f'<div class="prompt">{word_diff(c.replaces, c.prompt)}</div></div>')
    return "".join(parts)


def router(run: RunData) -> str:
    checks = run.checks()
    if not checks:
        return '<p class="muted">No check ran.</p>'
    parts = [image(plots.router_png(run), "router: failures by label and p_symbolic per check"),
             '<p class="muted">Each failing probe example gets p_symbolic, a logistic score of its '
             'features; 0.5 or more labels it "symbolic" (a prompt can fix it), otherwise "numerical" '
             '(the weights must learn it).</p>']
    for c in checks:
        features = sorted({k for lab in c.labels for k in (lab.get("features") or {})})
        rows = [[lab.get("example_id"), lab.get("label"), lab.get("p_symbolic"),
                 *[(lab.get("features") or {}).get(k) for k in features]] for lab in c.labels]
        weights = {k[2:]: v for k, v in c.scores.items() if k.startswith("w_")}
        other = {k: v for k, v in c.scores.items() if not k.startswith("w_")}
        parts.append(
            f"<details{' open' if c.action == 'symbolic' else ''}><summary>step {c.step}: "
            f"{badge(c.action)} {esc(len(c.labels))} labelled failures — {esc(c.reason)}</summary>"
            + table(["example", "label", "p_symbolic", *features], rows, numeric=range(2, 3 + len(features)))
            + (f"<p class=\"muted\">classifier weights: {esc(_pairs(weights))}<br>"
               f"scores: {esc(_pairs(other))}</p>"
               if c.scores else "")
            + "</details>")
    return "".join(parts)


def editor(run: RunData) -> str:
    usage, config = run.usage(), run.config
    parts = [kv_table([("editor", config.get("editor")), ("fallback", config.get("editor_fallback")),
                       ("backend", config.get("editor_backend")), ("model", config.get("editor_model"))])]
    if usage:
        parts.append("<h3>Usage</h3>")
        parts.append(table(["measure", "value"], [(words, usage.get(key)) for key, words in USAGE_ROWS
                                                  if key in usage], numeric=(1,)))
    else:
        parts.append('<p class="muted">No editor LLM usage was recorded (no LLM editor ran).</p>')
    limits = {k: v for k, v in config.items() if k.startswith("editor_max_") and k != "editor_max_tokens"}
    if limits:
        parts.append("<h3>Budget</h3>")
        parts.append(table(["cap", "value"], [(k, v if v else "no cap") for k, v in limits.items()]))
    if usage.get("budget_spent"):
        parts.append(f'<p class="note">Budget spent: {esc(usage["budget_spent"])}</p>')
    faults = run.faults()
    parts.append("<h3>Editor faults</h3>")
    parts.append(table(["step", "where", "count", "message"],
                       [(f.get("step"), f.get("where"), f.get("count"), f.get("message")) for f in faults],
                       numeric=(0, 2)) if faults else '<p class="muted">None: the editor never failed.</p>')
    return "".join(parts)


def augmented(run: RunData) -> str:
    rows = run.arts.augmented_rows
    collator = run.arts.state.get("collator") or {}
    parts = [f"<p>{esc(len(rows))} rows added to training after accepted edits (the model's own "
             "passing replies and reference replies of the probe examples an edit fixed, or pool "
             "rows); the collator renders them with the current prompt and mixes them in at "
             f"augment_share={esc(run.config.get('augment_share'))}.</p>"]
    if rows:
        by = Counter((r.get("source"), r.get("prompt_version")) for r in rows)
        parts.append(table(["source", "prompt version", "rows"],
                           [(s, v, n) for (s, v), n in sorted(by.items(), key=str)], numeric=(1, 2)))
        shown = []
        for r in rows[:25]:
            messages = r.get("messages") or []
            user = next((m.get("content") for m in messages if m.get("role") == "user"), "")
            reply = next((m.get("content") for m in messages if m.get("role") == "assistant"), "")
            shown.append((r.get("example_id"), r.get("source"), user, reply))
        parts.append(f"<details><summary>the first {len(shown)} rows</summary>"
                     + table(["example", "source", "question", "reply"], shown) + "</details>")
    if collator:
        parts.append("<h3>What the batches carried</h3>")
        parts.append(kv_table(sorted(collator.items())))
    return "".join(parts)


def configuration(run: RunData) -> str:
    versions = run.arts.versions
    note = ""
    if not versions:
        versions = package_versions()
        note = ('<p class="note">These artifacts do not record versions (versions.json); shown '
                "are the versions installed where the report was written.</p>")
    first = ("torch", "transformers", "trl", "peft", "python")  # what a reader looks for first
    ordered = sorted(versions.items(), key=lambda kv: (first.index(kv[0]) if kv[0] in first else len(first), kv[0]))
    parts = ["<h3>Versions</h3>", note, kv_table(ordered),
             "<h3>NSLoRA config</h3>",
             '<p class="muted">As saved in config.json (API keys are never in it: only the name of '
             "the variable that holds one).</p>",
             kv_table(run.config.items()) if run.config else '<p class="muted">config.json not found</p>']
    return "".join(parts)


def render_run(run: RunData) -> str:
    """The whole report page for `run`."""
    bodies = {"overview": overview, "timeline": timeline, "prompts": prompts, "router": router,
              "editor": editor, "data": augmented, "config": configuration}
    sections = [(id_, title, bodies[id_](run)) for id_, title in SECTIONS]
    steps = run.summary.get("steps")
    subtitle = f"{run.arts.root}" + (f" · {steps} steps" if steps is not None else "")
    return document("NSLoRA run report", subtitle, sections)
