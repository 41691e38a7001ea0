"""Editor LLM clients for three backends, and the TextGrad engines over them.

`editor_backend` picks one:

- "openai": any OpenAI-compatible endpoint at `editor_base_url` (OpenAI, vLLM, Ollama, llama.cpp
  server, `transformers serve`), through the openai SDK;
- "litellm": `editor_model` is a LiteLLM model string ("ollama/llama3", "anthropic/...",
  "openai/<name>" with `editor_base_url` as api_base); litellm is imported on first use;
- "local": `editor_model` is a model folder, run in-process with transformers `generate`.

Every backend goes through `EditorClient.chat`, which gives them the same behaviour: sampling
settings sent on every call (`editor_temperature`, `editor_max_tokens`); usage counted from the
server's `usage` (estimated at 4 characters a token when absent); budgets checked before each
call; a reply cache; retries on HTTP 5xx/429 and refused connections (`editor_retries`); errors
translated into `EditorError`s with one-line messages; replies capped in length.

Secrets: the API key is read from the environment variable the config *names* at the moment a
client is built and handed to the SDK; it is not kept on this object, and every message and reply
that leaves this module has the key (and any user:password in the URL) replaced by `***` — a
server that echoes the key back cannot put it in a log, an artifact or TextGrad's logs.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import tenacity

from nslora_plugin.core.config import NSLoRAConfig
from nslora_plugin.core.chat import chat_messages
from nslora_plugin.core.util import redact, url_password
from nslora_plugin.builtins.editors.budget import Budget, Usage, estimate_tokens
from nslora_plugin.builtins.editors.errors import (EditorBadReply, EditorBudgetSpent, EditorEmptyReply, EditorError,
                                                  EditorHTTPError, EditorTimeout, EditorUnreachable)
from nslora_plugin.builtins.editors.cache import ReplyCache, cache_key
from nslora_plugin.builtins.editors.structured import RESPONSE_FORMAT, TAGS, as_tagged

__all__ = ["EditorClient", "OpenAICompatibleClient", "LiteLLMClient", "LocalModelClient",
           "make_client", "make_engine", "make_lookup_engine", "Usage", "estimate_tokens",
           "safe_url"]

RETRY_STATUSES = {429, 500, 502, 503, 504}


def safe_url(url: str | None) -> str:
    """The URL without any user:password part (safe to show)."""
    if not url:
        return "<no url>"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"


class EditorClient:
    """The shared call path. Subclasses implement `_complete` (and `health` where it is cheaper)."""

    backend = "base"
    sequential = False  # True: calls are serialized (an in-process model)

    def __init__(self, config: NSLoRAConfig, usage: Usage | None = None,
                 budget: Budget | None = None, cache: ReplyCache | None = None) -> None:
        self.model = config.editor_model or "default"
        self.base_url = config.editor_base_url
        self.temperature = config.editor_temperature
        self.max_tokens = config.editor_max_tokens
        self.timeout = config.editor_timeout
        self.retries = config.editor_retries
        self.key_env = config.editor_api_key_env
        self.usage = usage or Usage()
        self.budget = budget
        self.cache = cache
        self.reply_cap = max(4000, 8 * self.max_tokens)  # no real reply of max_tokens is longer
        self.structured_output = config.editor_structured_output != "off"
        self.structured_refused = ""  # why the endpoint gets no response_format any more
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never show the SDK client (it holds the key)
        return f"{type(self).__name__}(model={self.model!r}, url={safe_url(self.base_url)!r})"

    # ---------------------------------------------------------------- secrets
    def redact(self, text: str) -> str:
        """`text` without this client's key, the URL's password, or any secret in the environment."""
        return redact(text, (os.environ.get(self.key_env), url_password(self.base_url)))

    def _error(self, cls: type[EditorError], message: str, **kw: Any) -> EditorError:
        return cls(self.redact(message), **kw)

    @property
    def where(self) -> str:
        return safe_url(self.base_url) if self.base_url else self.model

    # ---------------------------------------------------------------- calls
    def health(self) -> None:
        """Raise an `EditorError` if the backend cannot answer; default: a one-token call."""
        with self._lock:
            self.usage.health_checks += 1
        self._complete([{"role": "user", "content": "ping"}], timeout=min(self.timeout, 30.0),
                       max_tokens=1)

    @staticmethod
    def _messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
        return chat_messages(system_prompt or None, prompt)

    def _cache_key(self, messages: list[dict[str, str]], structured: bool = False) -> str:
        fields: dict[str, Any] = {}
        if structured and self.structured_request() != "none":  # only then, so replies cached
            fields["structured"] = self.structured_request()  # before structured output stay valid
        return cache_key(backend=self.backend, base_url=self.base_url or "", model=self.model,
                         messages=messages, temperature=self.temperature, max_tokens=self.max_tokens,
                         **fields)

    def forget(self, prompt: str, system_prompt: str | None = None, structured: bool = False) -> None:
        """Drop the cached reply to this request (it turned out unusable)."""
        if self.cache is not None:
            self.cache.forget(self._cache_key(self._messages(prompt, system_prompt), structured))

    # ---------------------------------------------------------------- structured output
    def structured_request(self) -> str:
        """What a structured call adds to the request here: "json_schema" (a `response_format`),
        "prefix" (the reply starts with the opening tag) or "none" (see `structured.py`)."""
        if not self.structured_output or self.structured_refused:
            return "none"
        return "json_schema"

    def chat(self, prompt: str, system_prompt: str | None = None, *, structured: bool = False) -> str:
        """One reply. `structured`: this is a TextGrad update call — ask for the candidate in a
        form the endpoint can guarantee (`structured_request`)."""
        messages = self._messages(prompt, system_prompt)
        how = self.structured_request() if structured else "none"
        structured = how != "none"
        key = None
        if self.cache is not None:
            key = self._cache_key(messages, structured)
            hit = self.cache.get(key)
            if hit is not None:
                with self._lock:
                    self.usage.cached_calls += 1
                return hit
        estimate = sum(estimate_tokens(m["content"]) for m in messages)
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.retries + 1),
            retry=tenacity.retry_if_exception(self._retryable),
            wait=tenacity.wait_incrementing(start=0.5, increment=0.5, max=2.0),
            before_sleep=self._count_retry, reraise=True)
        try:
            text = retrying(self._attempt, messages, estimate, how)
        except EditorHTTPError as exc:
            if how != "json_schema" or exc.status not in (400, 422):
                raise
            with self._lock:  # the server refuses response_format: plain calls from now on
                self.structured_refused = f"HTTP {exc.status}"
            return self.chat(prompt, system_prompt)
        text = self.redact(text or "")
        if len(text) > self.reply_cap:
            text = text[:self.reply_cap]
        if not text.strip():
            raise self._error(EditorEmptyReply, f"editor {self.where} returned an empty reply")
        if self.cache is not None and key is not None:
            self.cache.put(key, text, {"model": self.model, "time": time.time()})
        return text

    def _attempt(self, messages: list[dict[str, str]], estimate: int, how: str = "none") -> str:
        """One call within the budget: reserve, call, settle; a fault settles and is raised."""
        reserved = self.budget.reserve(estimate) if self.budget else 0
        timeout, cut_by = self.budget.call_timeout(self.timeout) if self.budget else (self.timeout, None)
        t0 = time.monotonic()
        try:
            try:
                text, usage = self._complete(messages, timeout=timeout, max_tokens=self.max_tokens,
                                             structured=how)
            except EditorError:
                raise
            except Exception as other:  # a backend bug must still settle the budget
                raise self._error(EditorBadReply, f"editor {self.where} failed "
                                  f"({type(other).__name__}: {_one_line(str(other), 120)})") from None
        except EditorError as exc:
            with self._lock:
                self.usage.failed_calls += 1
                self.usage.seconds += time.monotonic() - t0
            if self.budget:
                self.budget.settle(reserved, 0)
            if isinstance(exc, EditorTimeout) and cut_by is not None:
                scope = "round" if "_per_round=" in cut_by else "run"
                raise EditorBudgetSpent(f"{cut_by} reached (a call was stopped after "
                                        f"{timeout:.1f} s, the time left)", scope) from None
            raise
        tokens = self._count(messages, text, usage, time.monotonic() - t0)
        if self.budget:
            self.budget.settle(reserved, tokens)
        return text

    def _count_retry(self, _state: Any) -> None:
        with self._lock:
            self.usage.retried_calls += 1

    @staticmethod
    def _retryable(exc: BaseException) -> bool:
        if isinstance(exc, EditorUnreachable):
            return True
        return isinstance(exc, EditorHTTPError) and exc.status in RETRY_STATUSES

    def _count(self, messages: list[dict[str, str]], text: str,
               usage: tuple[int, int] | None, seconds: float) -> int:
        with self._lock:
            self.usage.calls += 1
            self.usage.seconds += seconds
            if usage is None:
                self.usage.estimated_calls += 1
                usage = (sum(estimate_tokens(m["content"]) for m in messages), estimate_tokens(text or ""))
            self.usage.prompt_tokens += usage[0]
            self.usage.completion_tokens += usage[1]
            return usage[0] + usage[1]

    def _complete(self, messages: list[dict[str, str]], *, timeout: float, max_tokens: int,
                  structured: str = "none") -> tuple[str, tuple[int, int] | None]:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# OpenAI-compatible endpoints (openai SDK)
# ------------------------------------------------------------------------------------------------


class OpenAICompatibleClient(EditorClient):
    backend = "openai"

    def __init__(self, config: NSLoRAConfig, usage: Usage | None = None,
                 budget: Budget | None = None, cache: ReplyCache | None = None) -> None:
        super().__init__(config, usage, budget, cache)
        from openai import OpenAI

        if not config.editor_base_url:
            raise ValueError("editor_base_url is not set")
        self._client = OpenAI(base_url=config.editor_base_url,
                              api_key=os.environ.get(config.editor_api_key_env) or "no-key",
                              timeout=config.editor_timeout, max_retries=0)

    def health(self) -> None:
        """`/models` first (free); servers that answer it with an error status (e.g.
        `transformers serve` lists its cache there) get a one-token chat completion instead."""
        from openai import APIStatusError

        with self._lock:
            self.usage.health_checks += 1
        try:
            self._client.with_options(timeout=min(self.timeout, 10.0)).models.list()
            return
        except APIStatusError:
            pass
        except Exception as exc:
            raise self._translate(exc, min(self.timeout, 10.0)) from None
        self._complete([{"role": "user", "content": "ping"}], timeout=min(self.timeout, 30.0),
                       max_tokens=1)

    def _complete(self, messages: list[dict[str, str]], *, timeout: float, max_tokens: int,
                  structured: str = "none") -> tuple[str, tuple[int, int] | None]:
        extra: dict[str, Any] = {"response_format": RESPONSE_FORMAT} if structured == "json_schema" else {}
        try:
            resp = self._client.with_options(timeout=timeout).chat.completions.create(
                model=self.model, messages=messages, temperature=self.temperature,  # type: ignore[arg-type]
                max_tokens=max_tokens, **extra)
        except Exception as exc:
            raise self._translate(exc, timeout) from None
        choices = getattr(resp, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None:
            raise self._error(EditorBadReply, f"editor {self.where} sent a reply that is not a chat "
                              "completion (no choices)")
        text = choices[0].message.content or ""
        if not isinstance(text, str):
            raise self._error(EditorBadReply, f"editor {self.where} sent non-text content")
        u = getattr(resp, "usage", None)
        usage = None
        if u is not None and getattr(u, "prompt_tokens", None) is not None:
            usage = (int(u.prompt_tokens or 0), int(getattr(u, "completion_tokens", 0) or 0))
        return text, usage

    def _translate(self, exc: BaseException, timeout: float) -> EditorError:
        import openai

        if isinstance(exc, EditorError):
            return exc
        if isinstance(exc, openai.APITimeoutError):
            return self._error(EditorTimeout, f"editor call to {self.where} timed out after {timeout:.1f} s")
        if isinstance(exc, openai.APIConnectionError):
            cause = type(exc.__cause__).__name__ if exc.__cause__ else "connection error"
            return self._error(EditorUnreachable, f"cannot reach the editor endpoint {self.where} ({cause})")
        if isinstance(exc, openai.APIStatusError):
            body = _one_line(_status_detail(exc), 160)
            return self._error(EditorHTTPError, f"editor endpoint {self.where} answered HTTP "
                               f"{exc.status_code}: {body}", status=exc.status_code)
        return self._error(EditorBadReply, f"editor {self.where} sent a malformed reply "
                           f"({type(exc).__name__})")


def _status_detail(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(body or getattr(exc, "message", "") or "")


# ------------------------------------------------------------------------------------------------
# LiteLLM model strings
# ------------------------------------------------------------------------------------------------


def import_litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no cost-map download
    import litellm

    litellm.suppress_debug_info = True  # no "Give Feedback / Get Help" banners on errors
    return litellm


class LiteLLMClient(EditorClient):
    backend = "litellm"

    def __init__(self, config: NSLoRAConfig, usage: Usage | None = None,
                 budget: Budget | None = None, cache: ReplyCache | None = None) -> None:
        super().__init__(config, usage, budget, cache)
        if not config.editor_model:
            raise ValueError("editor_model is not set (a LiteLLM model string such as 'ollama/llama3')")
        self._litellm = import_litellm()

    def _complete(self, messages: list[dict[str, str]], *, timeout: float, max_tokens: int,
                  structured: str = "none") -> tuple[str, tuple[int, int] | None]:
        kwargs: dict[str, Any] = {"response_format": RESPONSE_FORMAT} if structured == "json_schema" else {}
        if self.base_url:
            kwargs["api_base"] = self.base_url
        # the named variable's key; a local server behind api_base may need none (the SDK wants
        # one anyway); without api_base LiteLLM reads its provider's own variables
        key = os.environ.get(self.key_env) or ("no-key" if self.base_url else None)
        if key:
            kwargs["api_key"] = key
        try:
            resp = self._litellm.completion(model=self.model, messages=messages,
                                            temperature=self.temperature, max_tokens=max_tokens,
                                            timeout=timeout, num_retries=0, max_retries=0, **kwargs)
        except Exception as exc:
            raise self._translate(exc, timeout) from None
        choices = getattr(resp, "choices", None)
        if not choices:
            raise self._error(EditorBadReply, f"editor {self.where} sent a reply with no choices")
        message = getattr(choices[0], "message", None)
        text = getattr(message, "content", None) or ""
        u = getattr(resp, "usage", None)
        usage = None
        if u is not None and getattr(u, "prompt_tokens", None):
            usage = (int(u.prompt_tokens or 0), int(getattr(u, "completion_tokens", 0) or 0))
        return str(text), usage

    def _translate(self, exc: BaseException, timeout: float) -> EditorError:
        name = type(exc).__name__
        status = getattr(exc, "status_code", None)
        text = str(exc).lower()
        if "timeout" in name.lower() or "timed out" in text:
            return self._error(EditorTimeout, f"editor call to {self.where} timed out after {timeout:.1f} s")
        # LiteLLM reports a refused connection as APIConnectionError or as HTTP 500 "Connection error."
        if name == "APIConnectionError" or "connection error" in text or "connection refused" in text:
            return self._error(EditorUnreachable, f"cannot reach the editor {self.where} ({name})")
        if isinstance(status, int) and status >= 400:
            detail = _one_line(re.sub(r"^litellm\.\w+:\s*", "", str(exc)), 160)
            return self._error(EditorHTTPError, f"editor {self.where} answered HTTP {status}: {detail}",
                               status=status)
        return self._error(EditorBadReply, f"editor {self.where} failed ({name}: "
                           f"{_one_line(str(exc), 120)})")


# ------------------------------------------------------------------------------------------------
# An in-process local model
# ------------------------------------------------------------------------------------------------


class LocalModelClient(EditorClient):
    """`editor_model` is a model folder; replies come from transformers `generate` in this process.

    Calls are serialized (one model, one generate at a time); usage is exact (token counts)."""

    backend = "local"
    sequential = True

    def __init__(self, config: NSLoRAConfig, usage: Usage | None = None,
                 budget: Budget | None = None, cache: ReplyCache | None = None) -> None:
        super().__init__(config, usage, budget, cache)
        if not config.editor_model:
            raise ValueError("editor_model is not set (a local model folder for editor_backend='local')")
        self.path = os.path.expanduser(config.editor_model)
        self._model: Any = None
        self._tokenizer: Any = None
        self._gen_lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"local model {os.path.basename(self.path.rstrip('/')) or self.path}"

    def _load(self) -> None:
        if self._model is not None:
            return
        if not os.path.isdir(self.path):
            raise self._error(EditorUnreachable, f"editor model folder {self.path} does not exist")
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.path)
            model = AutoModelForCausalLM.from_pretrained(self.path)
            model.eval()
        except Exception as exc:
            raise self._error(EditorUnreachable, f"cannot load the editor model {self.path} "
                              f"({type(exc).__name__}: {_one_line(str(exc), 120)})") from None
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self._tokenizer, self._model = tok, model

    def health(self) -> None:
        with self._lock:
            self.usage.health_checks += 1
        with self._gen_lock:
            self._load()

    def structured_request(self) -> str:
        return "prefix" if self.structured_output else "none"

    def _complete(self, messages: list[dict[str, str]], *, timeout: float, max_tokens: int,
                  structured: str = "none") -> tuple[str, tuple[int, int] | None]:
        import torch

        with self._gen_lock:
            self._load()
            tok, model = self._tokenizer, self._model
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:  # a tokenizer without a chat template
                text = "\n\n".join(m["content"] for m in messages) + "\n\n"
            prefix = TAGS[0] if structured == "prefix" else ""  # the reply can only continue it
            enc = tok(text + prefix, return_tensors="pt", add_special_tokens=False)
            sample = self.temperature > 0
            kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": sample,
                                      "pad_token_id": tok.pad_token_id, "max_time": timeout}
            if sample:
                kwargs["temperature"] = self.temperature
            try:
                with torch.no_grad():
                    out = model.generate(**enc, **kwargs)
            except Exception as exc:
                raise self._error(EditorBadReply, f"{self.where} failed to generate "
                                  f"({type(exc).__name__}: {_one_line(str(exc), 120)})") from None
            new = out[0, enc["input_ids"].shape[1]:]
            reply = prefix + tok.decode(new, skip_special_tokens=True)
            return reply.strip(), (int(enc["input_ids"].shape[1]), int(new.shape[0]))


BACKENDS: dict[str, type[EditorClient]] = {"openai": OpenAICompatibleClient,
                                           "litellm": LiteLLMClient, "local": LocalModelClient}


def configuration_problem(config: NSLoRAConfig) -> str | None:
    """What is missing for the configured backend, or None."""
    if config.editor_backend == "openai" and not config.editor_base_url:
        return "editor_base_url is not set"
    if config.editor_backend == "litellm" and not config.editor_model:
        return "editor_model is not set (editor_backend='litellm' needs a LiteLLM model string)"
    if config.editor_backend == "local" and not config.editor_model:
        return "editor_model is not set (editor_backend='local' needs a model folder)"
    return None


def make_client(config: NSLoRAConfig, usage: Usage | None = None, budget: Budget | None = None,
                cache: ReplyCache | None = None) -> EditorClient:
    return BACKENDS[config.editor_backend](config, usage, budget, cache)


# ------------------------------------------------------------------------------------------------
# TextGrad engines
# ------------------------------------------------------------------------------------------------


def _textgrad_base() -> type:
    from nslora_plugin.builtins.editors.textgrad_env import import_textgrad

    return import_textgrad().engine.EngineLM


def make_engine(client: EditorClient, update: bool = False) -> Any:
    """Wrap the client as a TextGrad `EngineLM` (generate + __call__, as TextGrad requires).

    `update`: the engine of a TGD step — its calls are structured (`client.structured_request`)
    and its replies parsed leniently and handed back in the exact tags (`structured.py`).
    `last_response`, `parsed_as` and `sent` are per engine object: make one engine per thread."""
    base = _textgrad_base()

    class EditorEngine(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.model_string = client.model
            self.client = client
            self.last_response: str | None = None
            self.parsed_as = "none"  # how the last update reply's candidate was found
            # (prompt, system prompt, structured) of each call, to forget unusable replies
            self.sent: list[tuple[str, str | None, bool]] = []

        def generate(self, prompt: Any, system_prompt: str | None = None, **kwargs: Any) -> str:
            if not isinstance(prompt, str):
                prompt = "\n".join(p for p in prompt if isinstance(p, str))
            self.sent.append((prompt, system_prompt, update))
            reply = client.chat(prompt, system_prompt=system_prompt, structured=update)
            if update:
                reply, self.parsed_as = as_tagged(reply)
            self.last_response = reply
            return reply

        def __call__(self, prompt: Any, **kwargs: Any) -> str:
            return self.generate(prompt, **kwargs)

        def __repr__(self) -> str:
            return f"EditorEngine({client!r})"

    return EditorEngine()


def make_lookup_engine(answers: dict[tuple[str, str], str], fallback: Any) -> Any:
    """The student model as a TextGrad engine: replies it already produced are looked up (they
    are real generations of the current adapter under the current prompt); anything else is
    generated by `fallback(system_prompt, prompt)`, one at a time."""
    base = _textgrad_base()
    lock = threading.Lock()

    class StudentEngine(base):  # type: ignore[misc, valid-type]
        model_string = "nslora-student"

        def generate(self, prompt: Any, system_prompt: str | None = None, **kwargs: Any) -> str:
            key = (system_prompt or "", str(prompt))
            with lock:
                if key not in answers:
                    answers[key] = fallback(system_prompt, str(prompt))
                return answers[key]

        def __call__(self, prompt: Any, **kwargs: Any) -> str:
            return self.generate(prompt, **kwargs)

    return StudentEngine()


__all__ += ["EditorError", "EditorBadReply", "EditorBudgetSpent", "EditorEmptyReply", "EditorHTTPError",
            "EditorTimeout", "EditorUnreachable", "configuration_problem", "BACKENDS"]
