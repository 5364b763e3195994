"""Model presets for KV-cache accounting: one YAML file per model, configuration only (no
weights). Loaded by ``sparsebench.kv.planner.load_preset``; a user's own file has the same fields."""
