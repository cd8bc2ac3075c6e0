"""The offline demo: a synthetic web served on loopback, and the recipe run over it."""
