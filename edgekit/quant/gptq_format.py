"""The GPTQ checkpoint layout (AutoGPTQ / GPTQModel, ``checkpoint_format: gptq``) that the builder reads.

Per linear ``NAME`` a checkpoint holds:

- ``NAME.qweight`` int32 [in * bits / 32, out]: codes packed along the input dimension, low bits first
  (input row ``r * 32 / bits + j`` sits in bits ``j * bits ..`` of word ``r``);
- ``NAME.qzeros`` int32 [groups, out * bits / 32]: zero points minus one (the AutoGPTQ v1 off-by-one,
  undone by the builder's ``handle_qzeros``), packed along the output dimension the same way;
- ``NAME.scales`` float16 [groups, out];
- ``NAME.g_idx`` int32 [in]: ``arange(in) // group_size``, trivial because edgekit's act-order uses static
  groups (see ``edgekit.quant.gptq``).

The int32 words are two's complement: a word whose top bit is set is negative, as AutoGPTQ writes it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from edgekit.quant.gptq import GPTQConfig, QuantizedWeight


def _pack_rows(values: Tensor, bits: int) -> Tensor:
    """Pack [rows, cols] codes (< 2**bits) along rows into int32 [rows * bits / 32, cols], low bits first."""
    per_word = 32 // bits
    rows, cols = values.shape
    if rows % per_word:
        raise ValueError(f"{rows} values cannot be packed {per_word} to an int32 word")
    grouped = values.to(torch.int64).reshape(rows // per_word, per_word, cols)
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).reshape(1, per_word, 1)
    words = (grouped << shifts).sum(dim=1)
    # Reinterpret the unsigned 32-bit words as two's complement int32.
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.to(torch.int32)


def _unpack_rows(words: Tensor, bits: int) -> Tensor:
    """Invert ``_pack_rows``: int32 [words, cols] -> int64 codes [words * 32 / bits, cols]."""
    per_word = 32 // bits
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per_word, dtype=torch.int64) * bits).reshape(1, per_word, 1)
    values = (unsigned.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(words.shape[0] * per_word, words.shape[1])


def pack_gptq(q: QuantizedWeight, bits: int) -> dict[str, Tensor]:
    """The ``qweight``, ``qzeros``, ``scales`` and ``g_idx`` tensors of one linear (prefix them with its name)."""
    if bits != q.bits:
        raise ValueError(f"the weight was quantized to {q.bits} bits, not {bits}")
    maxq = (1 << bits) - 1
    _out, columns = q.codes.shape
    scales16 = q.scales.to(torch.float16)
    if not torch.equal(scales16.to(q.scales.dtype), q.scales):
        raise ValueError("scales are not float16-exact; the checkpoint would not match the dequantized weight")
    return {
        "qweight": _pack_rows(q.codes.t(), bits),
        # Stored minus one, wrapping 0 to maxq, as AutoGPTQ v1 does; the builder adds the one back.
        "qzeros": _pack_rows((q.zeros.to(torch.int64) - 1) & maxq, bits).t().contiguous(),
        "scales": scales16.t().contiguous(),
        "g_idx": (torch.arange(columns, dtype=torch.int32) // q.group_size).to(torch.int32),
    }


def unpack_gptq(tensors: dict[str, Tensor], bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Invert ``pack_gptq``: ``(codes uint8 [out, in], scales float32 [out, groups], zeros uint8 [out, groups])``.

    Raises ``ValueError`` for a non-trivial ``g_idx`` (a desc_act checkpoint), which this layout cannot hold.
    """
    maxq = (1 << bits) - 1
    codes = _unpack_rows(tensors["qweight"], bits).t().contiguous()
    zeros = (_unpack_rows(tensors["qzeros"].t().contiguous(), bits) + 1) & maxq
    scales = tensors["scales"].to(torch.float32).t().contiguous()
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        trivial = torch.arange(codes.shape[1], dtype=torch.int64) // group_size
        if not torch.equal(g_idx.to(torch.int64), trivial):
            raise ValueError("g_idx is not arange(in) // group_size; act-order checkpoints need static groups")
    return codes.to(torch.uint8), scales, zeros.to(torch.uint8)


def quantization_config(config: GPTQConfig) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json for a checkpoint written with ``config``."""
    return {
        "quant_method": "gptq",
        "bits": config.bits,
        "group_size": config.group_size,
        # Static groups keep g_idx trivial, so the checkpoint is desc_act=False whatever act_order was.
        "desc_act": False,
        "sym": config.sym,
        "checkpoint_format": "gptq",
    }
