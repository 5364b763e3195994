"""The KV-cache planner and its model presets."""
