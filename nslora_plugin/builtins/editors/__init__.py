"""Editors propose new system prompts: TextGrad through an editor LLM (`clients`: an
OpenAI-compatible endpoint, a LiteLLM model string, or an in-process local model), demonstrations
taken from the pool, or the deterministic constraint editor (no LLM). All are plugins of
`nslora_propose_edit`; `errors` holds the editor's fault types, `budget` the usage meter and the
per-round / per-run budgets, `cache` the reply cache."""
