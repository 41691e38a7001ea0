"""The transformers adapter: the `TrainerCallback` that drives the core loop from any
`transformers.Trainer` (TRL, Axolotl and LLaMA-Factory build on it), its start-up checks, the
CPU-precision check and the adapter card. Imports the core and nothing above it."""
