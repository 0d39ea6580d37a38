"""Pre-quantized checkpoints (GPTQ, AWQ) as build sources.

onnxruntime-genai's builder turns their packed weights into MatMulNBits directly. The fp32 reference
that validation and accuracy measurement need is made here: every packed linear is dequantized into a
plain fp32 Hugging Face folder, so the reference is the checkpoint's own function, not the model it was
made from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from edgekit.errors import SourceError

SUPPORTED = {"gptq": (4, 8), "awq": (4,)}
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's interleave of 8 nibbles in an int32
_COPIED = (".json", ".jinja", ".model", ".txt", ".tiktoken")


def quantization_method(config: dict[str, Any], path: Path) -> str | None:
    """The checkpoint's quantization method (``gptq``/``awq``), None if unquantized; errors if unsupported."""
    quant = config.get("quantization_config")
    if not quant:
        return None
    fix = "use an unquantized checkpoint, or a GPTQ (AutoGPTQ/GPTQModel v1 format) or AWQ (GEMM) one"
    if not isinstance(quant, dict):
        raise SourceError(f"has a quantization_config that is not an object ({type(quant).__name__})", path=path,
                          fix=fix)  # fmt: skip
    method = str(quant.get("quant_method", "")).lower()
    if method not in SUPPORTED:
        raise SourceError(f"is quantized with '{method}', which edgekit cannot read", path=path, fix=fix)
    bits = quant.get("bits", quant.get("w_bit"))
    if bits not in SUPPORTED[method]:
        raise SourceError(
            f"is a {bits}-bit {method} checkpoint; edgekit reads {SUPPORTED[method]} bits", path=path, fix=fix
        )
    if method == "gptq" and quant.get("checkpoint_format", "gptq") != "gptq":
        raise SourceError(f"uses the '{quant['checkpoint_format']}' GPTQ layout", path=path, fix=fix)
    if method == "awq" and str(quant.get("version", "gemm")).lower() != "gemm":
        raise SourceError(f"uses the '{quant['version']}' AWQ layout", path=path, fix=fix)
    return method


def _unpack_int32(words: Any, bits: int, dim: int) -> Any:
    """Split each int32 into 32/bits values (low bits first) along ``dim``."""
    import torch

    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    moved = words.to(torch.int32).movedim(dim, -1)
    values = (moved.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    values = values.reshape(*moved.shape[:-1], moved.shape[-1] * per_word)
    return values.movedim(-1, dim)


def dequantize_gptq(tensors: dict[str, Any], bits: int) -> Any:
    """fp32 weight [out, in] of one GPTQ (v1) linear, honouring ``g_idx`` (act-order checkpoints too)."""
    import torch

    codes = _unpack_int32(tensors["qweight"], bits, 0).to(torch.float32)  # [in, out]
    zeros = ((_unpack_int32(tensors["qzeros"], bits, 1) + 1) & ((1 << bits) - 1)).to(torch.float32)  # [groups, out]
    scales = tensors["scales"].to(torch.float32)  # [groups, out]
    columns = codes.shape[0]
    group_size = columns // scales.shape[0]
    g_idx = tensors.get("g_idx")
    groups = g_idx.to(torch.int64) if g_idx is not None else torch.arange(columns) // group_size
    return ((codes - zeros[groups]) * scales[groups]).t().contiguous()


def dequantize_awq(tensors: dict[str, Any]) -> Any:
    """fp32 weight [out, in] of one AWQ GEMM linear (4-bit, packed along the output dimension)."""
    import torch

    order = torch.tensor(_AWQ_ORDER)
    inverse = torch.argsort(order)

    def unpack(words: Any) -> Any:
        values = _unpack_int32(words, 4, 1)  # [rows, out] in AWQ's interleaved order
        rows, out = values.shape
        return values.reshape(rows, out // 8, 8)[:, :, inverse].reshape(rows, out)

    codes = unpack(tensors["qweight"]).to(torch.float32)  # [in, out]
    zeros = unpack(tensors["qzeros"]).to(torch.float32)  # [groups, out]
    scales = tensors["scales"].to(torch.float32)
    group_size = codes.shape[0] // scales.shape[0]
    groups = torch.arange(codes.shape[0]) // group_size
    return ((codes - zeros[groups]) * scales[groups]).t().contiguous()


def dequantize_checkpoint(folder: Path, out: Path, config: dict[str, Any], method: str) -> None:
    """Write an fp32 Hugging Face folder at ``out`` holding the dequantized weights of ``folder``."""
    import torch
    from safetensors.torch import load_file, save_file

    bits = int(config["quantization_config"].get("bits", config["quantization_config"].get("w_bit", 4)))
    state: dict[str, Any] = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(path.resolve())))
    packed = sorted({name.rsplit(".", 1)[0] for name in state if name.endswith(".qweight")})
    result: dict[str, Any] = {}
    for name, tensor in state.items():
        if name.rpartition(".")[0] in packed:
            continue
        result[name] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
    for module in packed:
        parts = {
            leaf: state[f"{module}.{leaf}"]
            for leaf in ("qweight", "qzeros", "scales", "g_idx")
            if f"{module}.{leaf}" in state
        }
        weight = dequantize_gptq(parts, bits) if method == "gptq" else dequantize_awq(parts)
        result[f"{module}.weight"] = weight
        if f"{module}.bias" in state:
            result[f"{module}.bias"] = state[f"{module}.bias"].to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(result, str(out / "model.safetensors"), metadata={"format": "pt"})
    plain = {key: value for key, value in config.items() if key != "quantization_config"}
    plain["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(plain, indent=2), encoding="utf-8")
    for item in sorted(folder.iterdir()):
        if item.is_file() and item.name != "config.json" and item.name.endswith(_COPIED) and "index" not in item.name:
            shutil.copyfile(item.resolve(), out / item.name)
