"""What the streamed export learns from onnxruntime-genai's builder, as plain data: how it would quantize a
MatMul, and one of its ``make_matmul_float`` calls (``builder_compat`` reads them off the builder)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NBitsSettings:
    """How the builder would quantize a float MatMul at save time (its ``quant_attrs``)."""

    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int | None
    qdq: bool
    """QDQ nodes instead of MatMulNBits."""
    algorithm: str
    """The int4 rounding method: ``default``, ``rtn``, ``k_quant``."""
    per_node_bits: bool
    """Some MatMuls get another bit width than the rest (mixed-precision options)."""


@dataclass(frozen=True)
class MatMulCall:
    """One ``make_matmul_float`` call of the builder: the node's name, its input, and its output's."""

    name: str
    root_input: str
    output: str
    """``logits`` for an LM head the builder names so, else ``{name}/output_0``."""
    seq_dim: str

    @property
    def weight_name(self) -> str:
        """The builder's name for this MatMul's weight (``/model/x/MatMul`` -> ``model.x.MatMul.weight``)."""
        return self.name[1:].replace("/", ".") + ".weight"
