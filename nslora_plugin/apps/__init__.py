"""Applications built on the plugin: the harnesses (`nslora demo`, `compare`, `sweep`), the run
report, the tools (doctor, models, serve, inference) and the `nslora` command line."""
