"""The built-in plugins (rewards, router, prompts-as-data, editors): plugins like any third
party's, loaded by the registry by name and replaceable with `plugins: ["no:<name>"]`. They
import only the core."""
