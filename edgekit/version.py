"""The version of edgekit (the wheel reads it from here)."""

__version__ = "0.2.0"
