"""Compiles a recipe into Ray work: plan, phases, checkpoints, output shards, manifest."""
