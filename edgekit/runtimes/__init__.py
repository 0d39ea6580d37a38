"""Runtimes: load a package, choose its execution providers, generate text, and time it."""
