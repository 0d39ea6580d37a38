"""Build sources: classify and check a checkpoint folder, GGUF file or hub id before a weight is read."""
