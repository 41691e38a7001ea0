"""Thin adapters that connect NSLoRA to fine-tuning frameworks (installed as `nslora_plugin.integrations`)."""
