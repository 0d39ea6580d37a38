"""Quantization: the variant schemes a build makes (RTN INT4 through the builder, the fp32 reference)."""

from edgekit.quant.schemes import VariantSpec, plan_variants

__all__ = ["VariantSpec", "plan_variants"]
