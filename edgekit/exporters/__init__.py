"""Exporters: a checked source in, onnxruntime-genai model folders out (builder, streamed export, validation)."""
