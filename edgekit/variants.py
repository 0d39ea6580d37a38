"""The variants a build makes, as typed specs, and how each maps onto builder options.

Every package holds an fp32 reference (exported for the CPU, which is what validation and accuracy
measurement run on) and the variant its target deploys: INT4 round-to-nearest with the target's block
size and MatMulNBits accuracy level, or fp16/fp32 for targets that ask for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekit.targets import HeadPrecision, Int4Method, Precision, Provider, Target

REFERENCE_VARIANT = "fp32"
PREQUANTIZED_METHODS = ("gptq", "awq")
"""Variant methods whose weights reach the exporter packed (a GPTQ checkpoint made here, or the source's own)."""


@dataclass(frozen=True)
class VariantSpec:
    """One variant of a package: its folder name and how the builder makes it."""

    name: str
    precision: str  # fp32 | fp16 | int4
    method: str  # none | rtn
    provider: str
    block_size: int | None = None
    accuracy_level: int | None = None
    """MatMulNBits compute type; ``None`` leaves the builder's default for the provider."""
    lm_head: str = "int4"
    """``int4``, ``int8`` or ``float`` (the head MatMul left unquantized)."""

    def builder_options(self, *, tied_embeddings: bool = False) -> dict[str, str]:
        """The builder ``extra_options`` for this variant; ``tied_embeddings``: the source's head is its embedding."""
        options: dict[str, str] = {}
        if self.name == REFERENCE_VARIANT:
            # The final hidden states let evaluation cache the reference exactly and compactly.
            options["include_hidden_states"] = "true"
        if self.precision == "int4":
            options["block_size"] = str(self.block_size)
            if self.accuracy_level is not None:
                options["accuracy_level"] = str(self.accuracy_level)
            if self.lm_head == HeadPrecision.FLOAT.value:
                options["nodes_to_exclude"] = "/lm_head/MatMul"
            elif self.lm_head == HeadPrecision.INT8.value:
                # The builder's int8 head drops the weight a tied embedding shares with it (the model then
                # fails to load), so the head gets its own int8 copy; a tied embedding stays int4
                # (GatherBlockQuantized) as it is with an int4 head, an untied one stays float.
                options["matmul_mixed_precision"] = "last_matmul:int8"
                options["shared_embeddings"] = "false"
                if tied_embeddings:
                    options["op_types_to_quantize"] = "MatMul/Gather"
        return options


def reference_variant() -> VariantSpec:
    """The fp32 CPU reference every package carries."""
    return VariantSpec(REFERENCE_VARIANT, "fp32", "none", Provider.CPU.value)


def target_variants(target: Target) -> list[VariantSpec]:
    """The quantized or half-precision variants ``target`` asks for; the last is the one it deploys."""
    provider = target.build_provider.value
    if target.precision is Precision.INT4:
        level = target.accuracy_level or None
        head = target.lm_head.value
        return [
            VariantSpec(f"int4-{method.value}", "int4", method.value, provider, target.block_size, level, head)
            for method in target.int4_methods
        ]
    if target.precision is Precision.FP16:
        return [VariantSpec("fp16", "fp16", "none", provider)]
    return []


def deploy_variant(target: Target) -> VariantSpec:
    """The variant ``target`` runs on its first provider."""
    variants = target_variants(target)
    return variants[-1] if variants else reference_variant()


def plan_variants(target: Target) -> list[VariantSpec]:
    """The variants a build for ``target`` makes, reference first, the deployed one last."""
    return [reference_variant(), *target_variants(target)]


def uses_gptq(target: Target) -> bool:
    """Whether a build for ``target`` runs GPTQ."""
    return any(v.method == Int4Method.GPTQ.value for v in target_variants(target))


def prequantized_variants(target: Target, method: str) -> list[VariantSpec]:
    """Variants of a source that is already quantized (``gptq``/``awq``): the reference and the checkpoint's own.

    Layers the checkpoint left unquantized (the LM head, usually) follow the target's ``lm_head``.
    """
    provider = target.build_provider.value
    level = target.accuracy_level or None
    own = VariantSpec(f"int4-{method}", "int4", method, provider, target.block_size, level, target.lm_head.value)
    return [reference_variant(), own]
