"""The built-in reward-based router.

Per failing probe example, a logistic score over interpretable features gives `p_symbolic`, the
probability that a prompt edit (not a weight update) is the right fix:

    z = b + w_format * format_violation + w_nll * (ref_nll / nll_threshold)
          + w_wrong * wrong + w_missing * answer_missing
    p_symbolic = sigmoid(z)

Features (all per example, from the probe; `C1`/`C2` are global and act in the schedule below):
- `format_violation`: 1 if any constraint component (format, length, json) failed, else 0.
- `nll_ratio`: the reference reply's NLL per token over `nll_threshold`, capped at 5 — how
  unlikely the right reply is under the current adapter and prompt.
- `wrong`: 1 - the correctness reward (the *final answer*, as the format extracts it, is wrong).
- `answer_missing`: 1 if the right answer appears nowhere in the reply, whatever its form (0 when
  the example has no known answer). It separates content from form: "right answer, wrong form"
  is a prompt's job, "the answer is not there" is the weights'.

With the prior weights below: a violated constraint is "symbolic" (a prompt can state it) when the
answer is in the reply (or the example has no known answer) and the reference is not extremely
unlikely (NLL ratio under 4); a reply without the answer is "numerical" (the weights must learn it),
whether or not it also breaks the format; a compliant but wrong answer is "numerical". The NLL
weight is small because `answer_missing` measures content directly; NLL is only a proxy for it. Each check then decides for the whole run:

1. nothing failing → numerical;   2. symbolic budget spent or cooling down → numerical;
3. share of "symbolic" failures ≥ style_share_threshold → symbolic;
4. no prompt edit accepted yet, this rule not used yet in the run (`unstated_constraint_round`),
   and at least style_share_threshold of the failures break a constraint (even if their content
   is wrong too) → symbolic: the prompt has not stated the constraint yet, one round tries it and
   the gate keeps it only if reward does not drop. It overrides the labels, at most once per run,
   and the decision says how many it overrides (`labels_overridden`);
5. numerical training saturated (|C1| small and C2 small for `saturation_patience` checks) and
   something still fails → symbolic;   6. otherwise → numerical.
After `stall_patience` symbolic rounds in a row without an accepted gain, the router cools down
(numerical only) for `cooldown_checks` checks.

The router's counters (and the learned weights) are its own: they live in `run.stash` under
`ROUTER_STATE` and are saved to `state.json` under "router" through the state hooks.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from nslora_plugin.core.config import NSLoRAConfig
from nslora_plugin.core.hookspecs import hookimpl
from nslora_plugin.core.answers import CONSTRAINT_COMPONENTS
from nslora_plugin.core.run import RunView, StashKey
from nslora_plugin.core.records import EditOutcome, FailureLabel, ProbeReport, ProbeResult, RouteDecision, TrainingSignal

#: the built-in router's counters and learned weights (JSON-able; saved under "router")
ROUTER_STATE: StashKey[dict[str, Any]] = StashKey("router")

PRIOR_WEIGHTS: dict[str, float] = {"bias": -1.0, "format_violation": 3.0,
                                   "nll_ratio": -0.5, "wrong": 0.0, "answer_missing": -3.0}


def failure_features(result: ProbeResult, config: NSLoRAConfig) -> dict[str, float]:
    return {
        "format_violation": 1.0 - min((result.rewards.get(c, 1.0) for c in CONSTRAINT_COMPONENTS),
                                      default=1.0),
        "nll_ratio": min(result.ref_nll / config.nll_threshold, 5.0),
        "wrong": 1.0 - result.rewards.get("correctness", 1.0),
        "answer_missing": 1.0 - result.signals.get("answer_present", 1.0),
    }


def p_symbolic(features: dict[str, float], weights: dict[str, float]) -> float:
    z = weights.get("bias", 0.0) + sum(weights.get(k, 0.0) * v for k, v in features.items())
    return 1.0 / (1.0 + math.exp(-z))


class PriorRouter:
    """Classifier with interpretable prior weights plus the check-level schedule above."""

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        self.weights = dict(weights or PRIOR_WEIGHTS)

    @staticmethod
    def state(run: RunView) -> dict[str, Any]:
        return run.stash.setdefault(ROUTER_STATE, {})

    def current_weights(self, run: RunView | None) -> dict[str, float]:
        return self.weights

    @hookimpl(trylast=True)
    def nslora_classify_failure(self, result: ProbeResult, signal: TrainingSignal,
                                config: NSLoRAConfig, run: RunView) -> FailureLabel:
        features = failure_features(result, config)
        p = p_symbolic(features, self.current_weights(run))
        return FailureLabel(example_id=result.example_id, label="symbolic" if p >= 0.5 else "numerical",
                            p_symbolic=round(p, 4), features=features)

    @hookimpl(trylast=True)
    def nslora_route(self, signal: TrainingSignal, report: ProbeReport,
                     labels: Sequence[FailureLabel], config: NSLoRAConfig,
                     run: RunView) -> RouteDecision:
        state = self.state(run)
        saturated_now = signal.loss_flat and signal.grad_small
        state["flat_checks"] = state.get("flat_checks", 0) + 1 if saturated_now else 0
        n_fail = len(labels)
        symbolic = [lab for lab in labels if lab.label == "symbolic"]
        style_share = len(symbolic) / n_fail if n_fail else 0.0
        weights = self.current_weights(run)
        scores = {**{f"w_{k}": round(v, 4) for k, v in weights.items()},
                  "failures": float(n_fail), "style_share": round(style_share, 4),
                  "mean_p_symbolic": round(sum(lab.p_symbolic for lab in labels) / n_fail, 4) if n_fail else 0.0,
                  "flat_checks": float(state["flat_checks"]),
                  "symbolic_rounds": float(state.get("symbolic_rounds", 0)),
                  "cooldown": float(state.get("cooldown", 0))}

        def decide(action: str, reason: str) -> RouteDecision:
            return RouteDecision(step=signal.step, action=action, reason=reason,  # type: ignore[arg-type]
                                 scores=scores, labels=list(labels), signal=signal,
                                 probe=report.summary())

        if n_fail == 0:
            return decide("numerical", "every probe example passes; keep training the adapter")
        if state.get("symbolic_rounds", 0) >= config.max_symbolic_rounds:
            return decide("numerical", f"symbolic budget spent ({config.max_symbolic_rounds} rounds)")
        editor = run.editor
        if not editor.available:
            return decide("numerical", f"no editor available ({editor.reason})")
        if state.get("cooldown", 0) > 0:
            state["cooldown"] -= 1
            return decide("numerical", "symbolic edits stalled recently; cooling down with LoRA updates "
                          f"({state['cooldown']} checks left)")
        if style_share >= config.style_share_threshold:
            return decide("symbolic", f"{len(symbolic)}/{n_fail} failures look like style/constraint "
                          f"problems (share {style_share:.2f} >= {config.style_share_threshold})")
        broken = [r for r in report.failures  # read from the rewards, whatever the classifier
                  if min((r.rewards.get(c, 1.0) for c in CONSTRAINT_COMPONENTS), default=1.0) < 1.0]
        if (config.unstated_constraint_round and not state.get("accepted_edits", 0)
                and not state.get("unstated_constraint_rounds", 0)
                and len(broken) / n_fail >= config.style_share_threshold):
            state["unstated_constraint_rounds"] = 1
            overridden = n_fail - len(symbolic)
            scores["labels_overridden"] = float(overridden)
            return decide("symbolic", f"{len(broken)}/{n_fail} failures break a constraint the "
                          "prompt does not state yet; this overrides "
                          f"{overridden}/{n_fail} labels that say the content needs the weights, "
                          "once per run: one prompt edit states it and the gate keeps it only if "
                          "reward holds")
        if state["flat_checks"] >= config.saturation_patience:
            return decide("symbolic", f"numerical training saturated (C1={_fmt(signal.c1)}, "
                          f"C2={_fmt(signal.c2)} for {state['flat_checks']} checks) with "
                          f"{n_fail} failures left")
        return decide("numerical", f"{n_fail - len(symbolic)}/{n_fail} failures need the weights "
                      f"and loss still moves (C1={_fmt(signal.c1)}); keep training LoRA")

    @hookimpl
    def nslora_after_round(self, step: int, outcome: EditOutcome | None, run: RunView) -> None:
        record_symbolic_outcome(self.state(run), bool(outcome and outcome.accepted), run.config)

    @hookimpl
    def nslora_save_state(self, run: RunView) -> dict[str, Any]:
        return {"router": self.state(run)}

    @hookimpl
    def nslora_load_state(self, state: dict[str, Any], run: RunView) -> None:
        run.stash[ROUTER_STATE] = dict(state.get("router", {}))


class LearnedRouter(PriorRouter):
    """The prior classifier, updated online from what actually happened.

    After a symbolic round, every example that failed at its check is remembered with its features,
    its reward before the round (`r0`) and under the prompt the round left in place (`r1`). At the
    next check, after a window of LoRA updates, its reward is `r2`. If the prompt change helped it
    more than the weight updates did (`r1 - r0 > r2 - r1`) the target is "symbolic" (1), if the
    weights helped more it is "numerical" (0); ties teach nothing. One logistic-regression SGD step
    per observation (`router_learning_rate`), in example-id order, so runs are deterministic. The
    weights live in the router state (saved in `state.json`, restored on resume) and are logged
    with every decision.
    """

    def current_weights(self, run: RunView | None) -> dict[str, float]:
        if run is None:
            return self.weights
        return self.state(run).setdefault("weights", dict(self.weights))

    @hookimpl
    def nslora_after_route(self, decision: RouteDecision, report: ProbeReport, run: RunView) -> None:
        state = self.state(run)
        self._learn(state, report, run.config)
        state["last_check"] = {r.example_id: [r.reward, failure_features(r, run.config)]
                               for r in report.results if not r.passed}

    @hookimpl
    def nslora_after_round(self, step: int, outcome: EditOutcome | None, run: RunView) -> None:
        super().nslora_after_round(step, outcome, run)
        state = self.state(run)
        if outcome is None or not state.get("last_check"):
            return
        after = {r.example_id: r.reward for r in run.reports[-1].results} if outcome.accepted else {}
        state["pending"] = {eid: [r0, after.get(eid, r0), feats]
                            for eid, (r0, feats) in state["last_check"].items()}

    def _learn(self, state: dict, report: ProbeReport, config: NSLoRAConfig) -> None:
        pending = state.pop("pending", None)
        if not pending:
            return
        now = {r.example_id: r.reward for r in report.results}
        weights = state.setdefault("weights", dict(self.weights))
        lr = config.router_learning_rate
        seen = 0
        for eid in sorted(pending):
            r0, r1, feats = pending[eid]
            if eid not in now:
                continue
            gain_prompt, gain_weights = r1 - r0, now[eid] - r1
            if abs(gain_prompt - gain_weights) < 1e-9:
                continue
            target = 1.0 if gain_prompt > gain_weights else 0.0
            error = target - p_symbolic(feats, weights)
            weights["bias"] = weights.get("bias", 0.0) + lr * error
            for key, value in feats.items():
                weights[key] = weights.get(key, 0.0) + lr * error * value
            seen += 1
        state["observations"] = state.get("observations", 0) + seen


def record_symbolic_outcome(state: dict, accepted: bool, config: NSLoRAConfig) -> None:
    """Update the stall counter after a symbolic round."""
    state["symbolic_rounds"] = state.get("symbolic_rounds", 0) + 1
    state["accepted_edits"] = state.get("accepted_edits", 0) + int(accepted)
    state["stalled_rounds"] = 0 if accepted else state.get("stalled_rounds", 0) + 1
    if state["stalled_rounds"] >= config.stall_patience:
        state["cooldown"] = config.cooldown_checks
        state["stalled_rounds"] = 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
