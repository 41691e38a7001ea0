"""NSLoRA adapter for llamafactory."""
