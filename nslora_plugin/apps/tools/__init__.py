"""Tools around a run: the memory estimate (`doctor`), the embedded default model (`models`) and
an editor LLM on loopback (`serve`). Importing them imports no framework."""
