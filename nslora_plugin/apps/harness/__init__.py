"""Harnesses that run NSLoRA end to end on data they make or load: `nslora demo` (`demo`),
`nslora compare` (`compare`) and its tasks (`tasks`). Users' runs never import these."""
