"""The report's pictures, drawn with matplotlib's Agg canvas and returned as PNG bytes.

Figures are built with the object API (`Figure` + `FigureCanvasAgg`), never `pyplot`: no global
state, no backend switch in the caller's process (a notebook keeps its own backend), no window.
matplotlib is the optional `plots` extra: without it every function returns None and the page
says where a plot would have been.
"""

from __future__ import annotations

import io
from typing import Any, Callable

from nslora_plugin.apps.report.data import METRIC_NAMES, RunData, label_kind

PLOTS_MISSING = ("matplotlib is not installed, so this plot is left out; "
                 "pip install 'nslora-plugin[plots]' and run nslora report again")

#: one colour per meaning, used on every plot of a page
COLORS = {"numerical": "#7f7f7f", "symbolic": "#7b3fb5", "accepted": "#2ca02c",
          "rejected": "#d62728", "fault": "#ff7f0e", "resume": "#1f77b4",
          "symbolic": "#7b3fb5", "numerical": "#1f77b4", "loss": "#1f3b73", "c1": "#1f77b4",
          "c2": "#e6550d"}
SERIES = ["#1f77b4", "#2ca02c", "#e6550d", "#7b3fb5", "#8c564b", "#e377c2", "#17becf"]


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _render(draw: Callable[[Any], None], size: tuple[float, float], dpi: int = 100) -> bytes | None:
    """Run `draw(figure)` on a fresh Agg figure and return the PNG bytes (None without matplotlib)."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    with matplotlib.rc_context({"font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold",
                                "axes.spines.top": False, "axes.grid": True, "grid.alpha": 0.3}):
        fig = Figure(figsize=size, dpi=dpi)
        FigureCanvasAgg(fig)
        draw(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ the run
def _mark_decisions(ax: Any, run: RunData) -> None:
    """Faint vertical lines at every check, coloured by what it decided; accepted edits dashed."""
    for check in run.checks():
        ax.axvline(check.step, color=COLORS.get(check.action, "#999"), lw=1.2 if check.action == "symbolic" else 0.8,
                   alpha=0.35 if check.action == "symbolic" else 0.2, zorder=0)
    for event in run.events():
        if event.kind == "accepted":
            ax.axvline(event.step, color=COLORS["accepted"], lw=1.2, ls="--", alpha=0.7, zorder=0)


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_yticks([])


def timeline_png(run: RunData) -> bytes | None:
    """Four panels over optimizer steps: training loss; C1 and C2 at each check with their
    thresholds; probe reward / accuracy / format compliance at each evaluation; and a strip
    with every decision (numerical, symbolic round, edit accepted / rejected, editor fault)."""

    def draw(fig: Any) -> None:
        axes = fig.subplots(4, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 2.2, 2.6, 1.3]})
        fig.subplots_adjust(left=0.07, right=0.77, top=0.965, bottom=0.055, hspace=0.3)
        checks, config = run.checks(), run.config
        steps = [c.step for c in checks] + [s for s, _ in run.losses()] + [e.step for e in run.events()]
        x_max = max(steps + [int(run.summary.get("steps") or 0), 1])

        ax = axes[0]
        losses = run.losses()
        if losses:
            ax.plot([s for s, _ in losses], [v for _, v in losses], color=COLORS["loss"], lw=1.4,
                    label="training loss (trainer log)")
        windowed = [(c.step, c.loss) for c in checks if isinstance(c.loss, (int, float))]
        if windowed:
            ax.plot([s for s, _ in windowed], [v for _, v in windowed], "o", color=COLORS["loss"],
                    mfc="white", ms=5, label="windowed loss at a check")
        if not losses and not windowed:
            _no_data(ax, "no training loss logged")
        else:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        ax.set_ylabel("loss")
        ax.set_title("Training loss")
        _mark_decisions(ax, run)

        ax = axes[1]
        c1 = [(c.step, c.c1) for c in checks if isinstance(c.c1, (int, float))]
        c2 = [(c.step, c.c2) for c in checks if isinstance(c.c2, (int, float))]
        handles = []
        if c1:
            handles += ax.plot([s for s, _ in c1], [v for _, v in c1], "o-", color=COLORS["c1"], ms=4,
                               label="C1 (relative loss change)")
            band = config.get("loss_change_threshold")
            if isinstance(band, (int, float)):
                ax.axhspan(-band, band, color=COLORS["c1"], alpha=0.08)
                handles.append(ax.axhline(band, color=COLORS["c1"], ls=":", lw=0.8,
                                          label=f"|C1| < {band:g}: flat"))
                ax.axhline(-band, color=COLORS["c1"], ls=":", lw=0.8)
                reach = max([1.5 * band] + [1.15 * abs(v) for _, v in c1])
                ax.set_ylim(-reach, reach)  # the band's edges sit clear of C2's threshold line
        ax.set_ylabel("C1", color=COLORS["c1"])
        if not c1:
            ax.set_yticks([])
            ax.text(0.02, 0.9, "C1: not yet defined (it needs two full loss windows)",
                    transform=ax.transAxes, fontsize=8, color=COLORS["c1"], va="top")
        if c2:
            twin = ax.twinx()
            twin.grid(False)
            handles += twin.plot([s for s, _ in c2], [v for _, v in c2], "s-", color=COLORS["c2"], ms=4,
                                 label="C2 (grad norm)")
            limit = config.get("grad_norm_threshold")
            if isinstance(limit, (int, float)):
                handles.append(twin.axhline(limit, color=COLORS["c2"], ls="--", lw=0.8,
                                            label=f"C2 < {limit:g}: small"))
            twin.set_ylabel("C2", color=COLORS["c2"])
            top = max([v for _, v in c2] + ([limit] if isinstance(limit, (int, float)) else []))
            twin.set_ylim(0, 1.12 * top if top > 0 else 1.0)
        if handles:
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.08, 1.0), fontsize=8, frameon=False)
        else:
            _no_data(ax, "no check had a loss window yet (C1 / C2 need two windows)")
        ax.set_title("Monitoring signal at each check")
        _mark_decisions(ax, run)

        ax = axes[2]
        metrics = run.probe_metrics()
        markers = "osD^v<>"
        for i, key in enumerate(metrics):  # shrinking markers: equal values stay visible
            series = run.probe_series(key)
            ax.plot([s for s, _ in series], [v for _, v in series], "-", marker=markers[i % len(markers)],
                    ms=max(9 - 2 * i, 3), mfc="white" if i == 0 else None, lw=2.2 - 0.4 * min(i, 3),
                    color=SERIES[i % len(SERIES)], label=METRIC_NAMES.get(key, key), zorder=3 + i)
        if metrics:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        else:
            _no_data(ax, "no probe evaluation recorded")
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("probe mean")
        n = (run.arts.probe_reports[0].get("n") if run.arts.probe_reports else None)
        ax.set_title("Probe at each evaluation" + (f" (n={n})" if n else "")
                     + "; an accepted edit is re-scored at its step")
        _mark_decisions(ax, run)

        ax = axes[3]
        rows = {"check": 2, "gate": 1, "fault": 0}
        placed: dict[tuple[int, str], int] = {}
        styles = {"numerical": ("check", "o", "numerical (train LoRA)"),
                  "symbolic": ("check", "*", "symbolic round"),
                  "accepted": ("gate", "^", "edit accepted"), "rejected": ("gate", "x", "edit rejected"),
                  "fault": ("fault", "D", "editor fault"), "resume": ("check", "|", "resumed")}
        handles: dict[str, Any] = {}
        for event in run.events():
            row, marker, label = styles.get(event.kind, ("check", ".", event.kind))
            count = placed.get((event.step, event.kind), 0)
            placed[(event.step, event.kind)] = count + 1
            (line,) = ax.plot([event.step], [rows[row] + 0.22 * count], marker, ls="none",
                              color=COLORS.get(event.kind, "#333"), ms=11 if marker == "*" else 7,
                              mew=2 if marker in "x|" else 1, label=label)
            handles.setdefault(event.kind, line)
        ax.set_yticks(list(rows.values()), list(rows))
        ax.set_ylim(-0.5, 2.9)
        ax.grid(axis="y", alpha=0)
        if handles:  # one entry per kind, always in the same order
            ordered = [handles[k] for k in styles if k in handles] + [h for k, h in handles.items() if k not in styles]
            ax.legend(handles=ordered, loc="upper left", bbox_to_anchor=(1.01, 1.15), fontsize=8, frameon=False)
        ax.set_title("Decisions")
        ax.set_xlabel("optimizer step")
        ax.set_xlim(-0.03 * x_max - 0.5, x_max * 1.03 + 0.5)

    return _render(draw, (11, 10))


def router_png(run: RunData) -> bytes | None:
    """Per check: the failures by label (stacked bars, with the decision above) and each
    failure's `p_symbolic` against the 0.5 boundary."""
    checks = [c for c in run.checks()]
    if not checks:
        return None

    def draw(fig: Any) -> None:
        left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.25]})
        fig.subplots_adjust(left=0.07, right=0.98, top=0.9, bottom=0.2, wspace=0.22)
        xs = list(range(len(checks)))
        every = max(1, len(checks) // 15)  # a long run: label every k-th check
        ticks = [f"step {c.step}" if i % every == 0 else "" for i, c in enumerate(checks)]
        style = [sum(1 for lab in c.labels if label_kind(lab.get("label")) == "symbolic") for c in checks]
        factual = [sum(1 for lab in c.labels if label_kind(lab.get("label")) == "numerical") for c in checks]
        left.bar(xs, factual, color=COLORS["numerical"], label="numerical (LoRA's job)")
        left.bar(xs, style, bottom=factual, color=COLORS["symbolic"], label="symbolic (a prompt's job)")
        top = max([f + s for f, s in zip(factual, style)] + [1])
        for x, c, f, s in zip(xs, checks, factual, style):
            if len(checks) > 30:  # too many to letter; the colours of the timeline still say it
                break
            left.text(x, f + s + top * 0.03, "S" if c.action == "symbolic" else "N", ha="center",
                      fontweight="bold", color=COLORS.get(c.action, "#333"))
        left.set_ylim(0, top * 1.18)
        left.set_xticks(xs, ticks, rotation=45 if len(xs) > 6 else 0, ha="right" if len(xs) > 6 else "center")
        left.set_ylabel("failing probe examples")
        left.set_title("Failures by label (S: symbolic round, N: numerical)")
        fig.legend(handles=left.get_legend_handles_labels()[0], loc="lower center", ncol=2,
                   fontsize=8, frameon=False)
        for x, c in zip(xs, checks):
            for j, lab in enumerate(c.labels):
                jitter = ((j * 0.618) % 1.0 - 0.5) * 0.5  # deterministic spread, no RNG
                p = lab.get("p_symbolic")
                if isinstance(p, (int, float)):
                    right.plot(x + jitter, p, "o", ms=5, alpha=0.75,
                               color=COLORS.get(str(label_kind(lab.get("label"))), "#333"))
        right.axhline(0.5, color="#333", ls="--", lw=0.9)
        right.text(len(xs) - 0.5, 0.52, "style ≥ 0.5", ha="right", va="bottom", fontsize=8)
        right.set_xlim(-0.6, len(xs) - 0.4)
        right.set_ylim(-0.03, 1.03)
        right.set_xticks(xs, ticks, rotation=45 if len(xs) > 6 else 0, ha="right" if len(xs) > 6 else "center")
        right.set_ylabel("p_symbolic")
        right.set_title("Each failure's p_symbolic (colour: its label)")

    return _render(draw, (10, 3.8))


# ------------------------------------------------------------------------------------ compare
def _arm_points(result: dict[str, Any], arm: str) -> list[float]:
    """Held-out accuracy of `arm` per seed (one value for a one-seed run)."""
    per_seed = result.get("per_seed") or {}
    points = [float(runs[arm]["held_out"]["accuracy"]) for runs in per_seed.values()
              if isinstance(runs, dict) and arm in runs and "accuracy" in (runs[arm].get("held_out") or {})]
    if points:
        return points
    held = (result.get("arms", {}).get(arm) or {}).get("held_out") or {}
    return [float(v) for v in held.get("accuracy_per_seed") or ([held["accuracy"]] if "accuracy" in held else [])]


def compare_png(result: dict[str, Any]) -> bytes | None:
    """Held-out accuracy per arm: the mean as a bar (± sd over seeds), every seed as a dot, the
    untouched base model as a dashed line."""
    arms = list(result.get("arms") or {})
    if not arms:
        return None
    verdict = result.get("verdict") or {}
    best = set(verdict.get("tied") or []) | ({verdict["winner"]} if verdict.get("winner") else set())

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        fig.subplots_adjust(left=0.09, right=0.98, top=0.9, bottom=0.2)
        for x, arm in enumerate(arms):
            held = result["arms"][arm].get("held_out") or {}
            points = _arm_points(result, arm)
            mean = held.get("accuracy", sum(points) / len(points) if points else 0.0)
            sd = held.get("accuracy_sd", 0.0) if len(points) > 1 else 0.0
            color = COLORS["symbolic"] if arm in best else "#9ecae1"
            ax.bar(x, mean, color=color, edgecolor="#333", lw=0.6, width=0.62,
                   yerr=sd if sd else None, capsize=4, error_kw={"lw": 1})
            for j, p in enumerate(points):
                offset = (j - (len(points) - 1) / 2) * 0.12
                ax.plot(x + offset, p, "o", color="#222", ms=5, mfc="white", mew=1.2, zorder=4)
            top = max([mean + (sd or 0.0)] + points)  # the label clears the bar, its sd and its dots
            ax.text(x, min(top + 0.035, 1.06), f"{mean:.3f}", ha="center", fontsize=8.5, fontweight="bold")
        base = (result.get("base") or {}).get("accuracy")
        if isinstance(base, (int, float)):
            ax.axhline(base, color="#555", ls="--", lw=1.0, label=f"base model, untouched: {base:.3f}")
            ax.legend(loc="upper left", fontsize=8, frameon=False)
        ax.set_xticks(range(len(arms)), arms, rotation=20, ha="right")
        ax.set_ylim(-0.02, 1.1)
        ax.set_ylabel("held-out accuracy")
        n_seeds = max((len(_arm_points(result, a)) for a in arms), default=1)
        n = next((result["arms"][a].get("held_out", {}).get("n") for a in arms
                  if result["arms"][a].get("held_out", {}).get("n")), None)
        ax.set_title("Held-out accuracy per arm" + (f" (n={n})" if n else "")
                     + (f": bar = mean ± sd over {n_seeds} seeds, dots = seeds" if n_seeds > 1 else "")
                     + ("; highest in purple" if best else ""))

    return _render(draw, (9, 4.6))


def sweep_png(sweep: dict[str, Any]) -> bytes | None:
    """Held-out accuracy against the mix of weaknesses, one line per arm with its 95 %
    interval, every seed as a faint dot."""
    points = sweep.get("points") or []
    arms = list(sweep.get("arms") or (points[0]["arms"] if points else []))
    if not points or not arms:
        return None

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        fig.subplots_adjust(left=0.09, right=0.78, top=0.9, bottom=0.14)
        xs = [100 * float(p.get("style_share", 0)) for p in points]
        span = (max(xs) - min(xs)) or 1.0
        for i, arm in enumerate(arms):
            color = SERIES[i % len(SERIES)]
            stats = [p["arms"].get(arm) or {} for p in points]
            ys = [s.get("accuracy", float("nan")) for s in stats]
            lo = [y - (s.get("interval95") or [y, y])[0] for y, s in zip(ys, stats)]
            hi = [(s.get("interval95") or [y, y])[1] - y for y, s in zip(ys, stats)]
            shift = (i - (len(arms) - 1) / 2) * span * 0.012  # arms side by side at each mix
            ax.errorbar([x + shift for x in xs], ys, yerr=[lo, hi], marker="o", capsize=3, color=color,
                        label=arm, lw=1.5)
            for x, s in zip(xs, stats):
                seeds = s.get("per_seed") or []
                ax.plot([x + shift] * len(seeds), seeds, ".", color=color, alpha=0.45, ms=6)
        ax.set_xlabel("share of weaknesses a prompt can fix (facts stated in the question), %")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xticks(xs)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_title("When does each update help? (bars: 95 % interval, dots: seeds)")

    return _render(draw, (9, 4.6))
