"""The manifest: build, validate, verify, inspect."""
