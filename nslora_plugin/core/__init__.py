"""The kernel: records, config (with `keys`: the `nslora` switch, the key prefix, "did you mean"),
the run view and its stash, the hook contract, the plugin registry, the loop and the parts it
drives (monitor, probe, the candidate check in `candidates`, gate, collator, prompt state,
artifacts).

Imports no framework at module import time and none of `builtins/`, `trainer/`, `apps/` or the
adapters: the built-in plugins are loaded by the registry by dotted name."""
