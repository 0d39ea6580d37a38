"""The package on disk: manifest, verification, allow-lists, archives and atomic creation."""
