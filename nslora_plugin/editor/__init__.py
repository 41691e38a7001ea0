"""Editors propose new system prompts: TextGrad through an editor LLM (an OpenAI-compatible
endpoint, a LiteLLM model string, or an in-process local model; see `engine`), or the deterministic
constraint editor (no LLM). Both are plugins of `nslora_propose_edit`; `budget` holds the usage
meter, the per-round / per-run budgets and the editor's fault types, `cache` the reply cache."""
