"""Editors propose new system prompts: TextGrad through an external LLM, or the deterministic
constraint editor (no LLM). Both are plugins of `nslora_propose_edit`."""
