"""NSLoRA adapter for axolotl."""
