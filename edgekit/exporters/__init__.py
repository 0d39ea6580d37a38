"""Exporters: checkpoints in (Hugging Face folder, GGUF file, hub id), onnxruntime-genai ONNX folders out."""

from edgekit.exporters.registry import Architecture, lookup_architecture, register, supported_architectures

__all__ = ["Architecture", "lookup_architecture", "register", "supported_architectures"]
