"""A TextGrad engine for any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp server,
`transformers serve`), and a usage meter.

TextGrad's own engines either hard-wire the public OpenAI API, cache on prompt text only, or leave
`__call__` empty; this one sends the sampling settings, counts calls and tokens (from the server's
`usage`, estimated at 4 characters a token when absent), has a timeout, and reads the API key from
the environment variable the config *names* — the key is never stored on the object's public
state, logged or serialized.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..config import NSLoRAConfig


@dataclass
class Usage:
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_calls: int = 0
    failed_calls: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _textgrad_base() -> type:
    from .textgrad_env import import_textgrad

    return import_textgrad().engine.EngineLM


def estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


class OpenAICompatibleClient:
    """Chat completions against `base_url` with usage accounting."""

    def __init__(self, config: NSLoRAConfig, usage: Usage | None = None) -> None:
        from openai import OpenAI

        if not config.editor_base_url:
            raise ValueError("editor_base_url is not set")
        self.model = config.editor_model or "default"
        self.temperature = config.editor_temperature
        self.max_tokens = config.editor_max_tokens
        self.usage = usage or Usage()
        self._lock = threading.Lock()
        key = os.environ.get(config.editor_api_key_env) or "no-key"
        self._client = OpenAI(base_url=config.editor_base_url, api_key=key,
                              timeout=config.editor_timeout, max_retries=0)
        del key

    def __repr__(self) -> str:  # never show the client (it holds the key)
        return f"OpenAICompatibleClient(model={self.model!r})"

    def health(self) -> None:
        """Raise if the endpoint is unreachable or cannot serve `model`.

        `/models` is tried first (free); servers that answer it with an error status (e.g.
        `transformers serve` lists its cache there) get a one-token chat completion instead."""
        from openai import APIStatusError

        quick = self._client.with_options(timeout=10.0)
        try:
            quick.models.list()
            return
        except APIStatusError:
            pass
        quick.chat.completions.create(model=self.model, max_tokens=1, temperature=0.0,
                                      messages=[{"role": "user", "content": "ping"}])

    def chat(self, prompt: str, system_prompt: str | None = None) -> str:
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": prompt})
        t0 = time.monotonic()
        try:
            resp = self._client.chat.completions.create(
                model=self.model, messages=messages, temperature=self.temperature,
                max_tokens=self.max_tokens)
        except Exception:
            with self._lock:
                self.usage.failed_calls += 1
                self.usage.seconds += time.monotonic() - t0
            raise
        text = (resp.choices[0].message.content or "") if resp.choices else ""
        with self._lock:
            self.usage.calls += 1
            self.usage.seconds += time.monotonic() - t0
            u = getattr(resp, "usage", None)
            if u is not None and getattr(u, "prompt_tokens", None) is not None:
                self.usage.prompt_tokens += int(u.prompt_tokens or 0)
                self.usage.completion_tokens += int(u.completion_tokens or 0)
            else:
                self.usage.estimated_calls += 1
                self.usage.prompt_tokens += sum(estimate_tokens(m["content"]) for m in messages)
                self.usage.completion_tokens += estimate_tokens(text)
        return text


def make_engine(client: OpenAICompatibleClient) -> Any:
    """Wrap the client as a TextGrad `EngineLM` (generate + __call__, as TextGrad requires)."""
    base = _textgrad_base()

    class OpenAICompatibleEngine(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.model_string = client.model
            self.client = client
            self.last_response: str | None = None

        def generate(self, prompt: Any, system_prompt: str | None = None, **kwargs: Any) -> str:
            if not isinstance(prompt, str):
                prompt = "\n".join(p for p in prompt if isinstance(p, str))
            self.last_response = client.chat(prompt, system_prompt=system_prompt)
            return self.last_response

        def __call__(self, prompt: Any, **kwargs: Any) -> str:
            return self.generate(prompt, **kwargs)

    return OpenAICompatibleEngine()


def make_lookup_engine(answers: dict[tuple[str, str], str], fallback: Any) -> Any:
    """The student model as a TextGrad engine: replies it already produced are looked up (they
    are real generations of the current adapter under the current prompt); anything else is
    generated by `fallback(system_prompt, prompt)`."""
    base = _textgrad_base()

    class StudentEngine(base):  # type: ignore[misc, valid-type]
        model_string = "nslora-student"

        def generate(self, prompt: Any, system_prompt: str | None = None, **kwargs: Any) -> str:
            key = (system_prompt or "", str(prompt))
            if key not in answers:
                answers[key] = fallback(system_prompt, str(prompt))
            return answers[key]

        def __call__(self, prompt: Any, **kwargs: Any) -> str:
            return self.generate(prompt, **kwargs)

    return StudentEngine()
