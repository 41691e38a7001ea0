"""What every editor that calls an LLM shares: its client, usage and budgets, the start-up verdict,
and the lifecycle hooks (start, status, usage, resume). TextGrad and GEPA subclass it and add
their rounds and their own `startup_problem`."""

from __future__ import annotations

from typing import Any

from nslora_plugin.builtins.editors.budget import Budget, Usage
from nslora_plugin.builtins.editors.cache import ReplyCache
from nslora_plugin.builtins.editors.clients import EditorClient, configuration_problem, make_client
from nslora_plugin.builtins.editors.errors import EditorBudgetSpent, EditorError
from nslora_plugin.core.config import NSLoRAConfig
from nslora_plugin.core.hookspecs import hookimpl
from nslora_plugin.core.records import EditorStatus
from nslora_plugin.core.run import RunView


class LLMEditor:
    name = "llm"

    def __init__(self) -> None:
        self.client: EditorClient | None = None
        self.usage = Usage()
        self.budget: Budget | None = None
        self._suspect = False  # the last round ended on a transport fault: health-check first
        self.started = False
        self.down_reason = ""  # why the start-up check failed
        self.budget_reason = ""  # why the run budget is spent, once it is (this run only)

    def startup_problem(self, config: NSLoRAConfig, run: RunView | None) -> str | None:
        """None when the editor can be used, else why not."""
        raise NotImplementedError

    # ---------------------------------------------------------------- lifecycle hooks
    @property
    def ready(self) -> bool:
        return self.started and not self.down_reason and not self.budget_reason

    def status(self) -> EditorStatus:
        reason = self.budget_reason or self.down_reason or ("" if self.started else "not started")
        return EditorStatus(self.name, ready=self.ready, reason=reason, uses_llm=True,
                            budget_spent=bool(self.budget_reason))

    @hookimpl
    def nslora_editor_start(self, config: NSLoRAConfig, run: RunView) -> EditorStatus:
        self.down_reason = self.startup_problem(config, run) or ""
        self.started = True
        return self.status()

    @hookimpl
    def nslora_editor_status(self, config: NSLoRAConfig, run: RunView) -> EditorStatus:
        return self.status()

    @hookimpl
    def nslora_editor_usage(self, run: RunView) -> dict[str, Any]:
        return self.usage.to_dict()

    @hookimpl
    def nslora_load_state(self, state: dict[str, Any], run: RunView) -> None:
        if state.get("usage"):  # a resumed run keeps counting against the same run budget
            self.usage.load(state["usage"])

    def endpoint_problem(self, config: NSLoRAConfig, run: RunView | None) -> str | None:
        """None when the editor's settings are valid, its endpoint (or local model) answers and
        the run budget (a resumed run's) can still pay for a round; else why not."""
        problem = configuration_problem(config)
        if problem:
            return problem
        try:
            client = self.connect(config, run)
            client.health()
        except Exception as exc:
            what = ("editor model unavailable" if config.editor_backend == "local"
                    else "editor endpoint unreachable")
            text = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            return f"{what} ({self.client.redact(text) if self.client else text})"
        if run is not None:
            self._check_run_budget(config, run)
        return None

    def usage_mark(self) -> tuple[int, int, int, int]:
        """The usage counters now, so that a round can say what it spent (`spent_since`)."""
        u = self.usage
        return (u.calls, u.tokens_used(), u.cached_calls, u.failed_calls)

    def spent_since(self, mark: tuple[int, int, int, int], seconds: float, step: int) -> dict[str, Any]:
        """What the round that began at `mark` spent; kept as the usage's `last_round`."""
        u = self.usage
        spent = {"calls": u.calls - mark[0], "tokens": u.tokens_used() - mark[1],
                 "cached": u.cached_calls - mark[2], "failed": u.failed_calls - mark[3],
                 "seconds": round(seconds, 3), "step": step}
        u.last_round = spent
        return spent

    def round_calls(self, config: NSLoRAConfig) -> int:
        """Calls the smallest round needs (one reflection call unless a subclass says more)."""
        return 1

    def _check_run_budget(self, config: NSLoRAConfig, run: RunView,
                          refused: EditorError | None = None) -> None:
        """Close the editor for the rest of the run once its run budget cannot pay for the
        smallest round (`round_calls`), or just refused a call."""
        if self.budget is None or self.budget_reason:
            return
        if isinstance(refused, EditorBudgetSpent) and refused.scope == "run":
            reason = str(refused)
        else:
            reason = self.budget.run_spent(self.round_calls(config))
        if reason is None:
            return
        self.usage.budget_spent = reason
        self.budget_reason = reason
        run.record_fault("budget", EditorBudgetSpent(
            f"the editor budget of this run is spent ({reason}); the router stays numerical from "
            "now on", "run"))

    def connect(self, config: NSLoRAConfig, run: RunView | None = None) -> EditorClient:
        if self.client is None:
            self.budget = Budget(config, self.usage)
            cache = None
            if config.editor_cache and run is not None:
                cache = ReplyCache(run.path("editor_cache"))
            self.client = make_client(config, self.usage, self.budget, cache)
        return self.client
