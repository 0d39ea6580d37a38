"""Runtimes: load a package, choose its execution providers, and generate text with onnxruntime-genai."""

from edgekit.runtimes.model import GenerationConfig, Model, ModelInfo, load
from edgekit.runtimes.providers import PROVIDERS, available_providers

__all__ = ["PROVIDERS", "GenerationConfig", "Model", "ModelInfo", "available_providers", "load"]
