"""Per-sample operations that score, filter or transform samples: cheap rule-based filters first."""
