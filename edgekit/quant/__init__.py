"""Quantization: GPTQ and the per-tensor recipes a build applies before export."""
