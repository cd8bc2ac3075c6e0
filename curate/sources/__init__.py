"""Readers of input: URL lists now; image folders, shards, HF datasets, MMC4, WARC, edits later."""
