"""Crafted GGUF files (issue #5, requirement 4): each is a CorruptFileError naming the file, in under a
second, in a child process limited to 1 GiB of address space. The files are written by hand below.

Files with a valid layout but unusable metadata (no tokenizer, hyperparameters that do not match the tensors,
a tokenizer transformers cannot build) are written with ``gguf``'s own writer and built with
``edgekit.pipeline.build``: each ends in a one-line typed error and leaves nothing beside OUT.
"""

from __future__ import annotations

import contextlib
import resource
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from limited import MiB, assert_refused_quickly, run_limited

from edgekit.errors import CorruptFileError, SourceError, UnsupportedArchitectureError
from edgekit.sources.gguf_header import read_gguf_header
from edgekit.sources.weight_files import check_gguf

F32, Q4_0 = 0, 2
STRING, ARRAY, UINT32 = 8, 9, 4


def text(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, value_type: int, payload: bytes) -> bytes:
    return text(key) + struct.pack("<I", value_type) + payload


def kv_str(key: str, value: str) -> bytes:
    return kv(key, STRING, text(value))


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, UINT32, struct.pack("<I", value))


def info(name: str | bytes, dims: list[int], ggml_type: int = F32, offset: int = 0, n_dims: int | None = None) -> bytes:
    count = len(dims) if n_dims is None else n_dims
    return (
        text(name)
        + struct.pack("<I", count)
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


ARCH = kv_str("general.architecture", "llama")


def gguf_bytes(
    kvs: list[bytes] | None = None,
    infos: list[bytes] | None = None,
    data: bytes | None = None,
    *,
    version: int = 3,
    tensor_count: int | None = None,
    kv_count: int | None = None,
    alignment: int = 32,
) -> bytes:
    """A GGUF file: header, metadata, tensor infos, padding to ``alignment``, data (default: one 8x2 F32)."""
    kvs = [ARCH] if kvs is None else kvs
    infos = [info("w", [8, 2])] if infos is None else infos
    data = bytes(64) if data is None else data
    head = b"GGUF" + struct.pack(
        "<IQQ",
        version,
        len(infos) if tensor_count is None else tensor_count,
        len(kvs) if kv_count is None else kv_count,
    )
    head += b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % alignment) + data


CASES = {
    "huge-tensor-count": (gguf_bytes(tensor_count=2**63), "declares 9223372036854775808 tensors"),
    "huge-kv-count": (gguf_bytes(kv_count=2**64 - 1), "edgekit reads at most"),
    "more-tensors-than-the-cap": (gguf_bytes(tensor_count=65537, infos=[bytes(65537 * 24)]), "at most 65536 tensors"),
    "more-keys-than-the-cap": (gguf_bytes(kv_count=65537, kvs=[bytes(65537 * 13)]), "65536 keys"),
    "more-tensors-than-the-file-holds": (gguf_bytes(tensor_count=1000), "more than the"),
    "n-dims-2^32-1": (gguf_bytes(infos=[info("w", [], n_dims=2**32 - 1)]), "declares 4294967295 dimensions"),
    "overflowing-dims": (gguf_bytes(infos=[info("w", [2**63, 2**63, 2**63, 2**63])]), "past the end"),
    "product-wraps-to-zero": (gguf_bytes(infos=[info("w", [2**32, 2**32])]), "past the end"),
    "zero-dimension": (gguf_bytes(infos=[info("w", [8, 0])], data=b""), "zero dimension"),
    "string-longer-than-file": (
        gguf_bytes(kvs=[kv("general.architecture", STRING, struct.pack("<Q", 2**62) + b"llama")]),
        "past the end",
    ),
    "key-longer-than-file": (gguf_bytes(kvs=[struct.pack("<Q", 2**40) + b"general"]), "more than the 65535"),
    "tensor-name-longer-than-file": (gguf_bytes(infos=[struct.pack("<Q", 2**63) + b"w"]), "tensor name"),
    "alignment-2^31": (gguf_bytes(kvs=[ARCH, kv_u32("general.alignment", 2**31)]), "general.alignment is 2147483648"),
    "alignment-not-a-power-of-two": (gguf_bytes(kvs=[ARCH, kv_u32("general.alignment", 48)]), "power of two"),
    "alignment-zero": (gguf_bytes(kvs=[ARCH, kv_u32("general.alignment", 0)]), "power of two"),
    "alignment-of-the-wrong-type": (
        gguf_bytes(kvs=[ARCH, kv_str("general.alignment", "32")]),
        "general.alignment is not an integer",
    ),
    "duplicate-keys": (gguf_bytes(kvs=[ARCH, ARCH]), "has the metadata key 'general.architecture' twice"),
    "duplicate-tensor-names": (
        gguf_bytes(infos=[info("w", [8, 2]), info("w", [8, 2], offset=64)], data=bytes(128)),
        "two tensors named 'w'",
    ),
    "string-array-longer-than-file": (
        gguf_bytes(kvs=[ARCH, kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 2**61))]),
        "past the end",
    ),
    "number-array-longer-than-file": (
        gguf_bytes(kvs=[ARCH, kv("tokenizer.ggml.scores", ARRAY, struct.pack("<IQ", 6, 2**62))]),
        "past the end",
    ),
    "nested-array": (
        gguf_bytes(kvs=[ARCH, kv("x", ARRAY, struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", 0, 0))]),
        "nested arrays",
    ),
    "unknown-value-type": (gguf_bytes(kvs=[ARCH, kv("x", 99, b"")]), "unknown value type 99"),
    "unknown-ggml-type": (gguf_bytes(infos=[info("w", [8, 2], ggml_type=99)]), "unknown ggml type 99"),
    "block-size-does-not-divide": (gguf_bytes(infos=[info("w", [8, 2], ggml_type=Q4_0)]), "not a multiple of 32"),
    "data-past-the-end": (gguf_bytes(infos=[info("w", [1024, 1024])]), "past the end"),
    "offset-past-the-end": (gguf_bytes(infos=[info("w", [8, 2], offset=2**63)]), "past the end"),
    "misaligned-offset": (gguf_bytes(infos=[info("w", [8, 2], offset=4)], data=bytes(68)), "not a multiple of 32"),
    "overlapping-tensors": (
        gguf_bytes(infos=[info("a", [8, 2]), info("b", [8, 2], offset=32)], data=bytes(96)),
        "overlaps",
    ),
    "version-1": (gguf_bytes(version=1), "GGUF version 1"),
    "big-endian": (gguf_bytes(version=0x03000000), "big-endian"),
    "not-utf8-key": (gguf_bytes(kvs=[kv(b"\xff\xfe", UINT32, bytes(4))]), "not UTF-8"),
    "cut-inside-the-counts": (gguf_bytes()[:12], "past the end"),
    "cut-inside-the-metadata": (gguf_bytes()[:62], "past the end"),
    "cut-inside-the-data": (gguf_bytes()[:-1], "past the end"),
}


def test_the_writer_makes_files_the_gguf_reader_accepts(tmp_path: Path) -> None:
    from gguf import GGUFReader

    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_bytes(kvs=[ARCH, kv_u32("general.alignment", 64)], alignment=64))
    header = read_gguf_header(path)
    reader = GGUFReader(str(path))
    assert header.metadata["general.architecture"] == "llama"
    assert header.alignment == 64
    assert [(t.name, t.offset, t.n_bytes) for t in header.tensors] == [
        (t.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors
    ]
    check_gguf(path)


@pytest.fixture(scope="module")
def crafted_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """Every crafted file checked by ``check_gguf`` in one child process limited to 1 GiB."""
    folder = tmp_path_factory.mktemp("crafted-gguf")
    paths = []
    for case, (content, _) in sorted(CASES.items()):
        paths.append(folder / f"{case}.gguf")
        paths[-1].write_bytes(content)
    results = run_limited("edgekit.sources.weight_files:check_gguf", paths, 1024 * MiB, warm=("gguf", "gguf.constants"))
    return {case: (path, result) for case, path, result in zip(sorted(CASES), paths, results, strict=True)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_crafted_gguf_file_is_refused_quickly_in_little_memory(crafted_results, case: str) -> None:
    path, result = crafted_results[case]
    assert_refused_quickly(result, path, CASES[case][1], "download or copy the GGUF file again")


def test_the_demo_header_matches_the_gguf_reader() -> None:
    from gguf import GGUFReader

    from edgekit.demo import demo_gguf_path

    path = demo_gguf_path()
    header = read_gguf_header(path)
    reader = GGUFReader(str(path))
    assert header.metadata["general.architecture"] == "llama"
    assert [(t.name, t.shape, t.offset, t.n_bytes) for t in header.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.data_offset), int(t.n_bytes)) for t in reader.tensors
    ]


def test_a_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(CorruptFileError) as info_:
        read_gguf_header(tmp_path / "absent.gguf")
    assert "does not exist" in str(info_.value)


def test_a_vocabulary_larger_than_the_read_block_is_walked_exactly(tmp_path: Path) -> None:
    from gguf import GGUFReader

    strings = [f"token-{i}-{'x' * (i % 13)}" for i in range(150_000)]  # about 2.7 MB: three read blocks
    tokens = kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, len(strings)) + b"".join(map(text, strings)))
    path = tmp_path / "vocab.gguf"
    path.write_bytes(gguf_bytes(kvs=[ARCH, tokens, kv_u32("after.vocab", 7)]))
    header = read_gguf_header(path)
    assert header.metadata["after.vocab"] == 7
    assert [t.offset for t in header.tensors] == [int(t.data_offset) for t in GGUFReader(str(path)).tensors]
    path.write_bytes(path.read_bytes()[:2_000_000])
    with pytest.raises(CorruptFileError, match="past the end"):
        read_gguf_header(path)


# -- valid layout, unusable metadata ------------------------------------------------------------------------

TINY_TOKENS = ["<unk>", "<s>", "</s>", *(f"t{i}" for i in range(13))]
_TINY_BLOCK = {
    "attn_norm": (8,),
    "attn_q": (8, 8),
    "attn_k": (8, 8),
    "attn_v": (8, 8),
    "attn_output": (8, 8),
    "ffn_norm": (8,),
    "ffn_gate": (16, 8),
    "ffn_up": (16, 8),
    "ffn_down": (8, 16),
}


def write_tiny_gguf(
    path: Path,
    *,
    tokenizer_model: str | None = "llama",
    hyperparameters: bool = True,
    feed_forward_length: int = 16,
    block_count: int = 1,
    tensors: dict[str, np.ndarray] | None = None,
    bos_token_id: int | None = None,
) -> Path:
    """A complete one-block llama GGUF (hidden size 8, 16 tokens) that transformers imports as it is.

    ``tokenizer_model=None`` leaves out the tokenizer metadata, ``hyperparameters=False`` the llama.* shape
    keys, and ``feed_forward_length`` and ``block_count`` declare those whatever the tensors hold.
    ``tensors`` replace or add tensors by GGUF name (numpy shapes are Hugging Face's, [out, in]);
    ``bos_token_id`` is written as a signed 32-bit integer.
    """
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    if hyperparameters:
        writer.add_block_count(block_count)
        writer.add_context_length(64)
        writer.add_embedding_length(8)
        writer.add_feed_forward_length(feed_forward_length)
        writer.add_head_count(2)
        writer.add_head_count_kv(2)
        writer.add_layer_norm_rms_eps(1e-5)
    if tokenizer_model is not None:
        writer.add_tokenizer_model(tokenizer_model)
        writer.add_token_list(TINY_TOKENS)
        writer.add_token_scores([0.0] * len(TINY_TOKENS))
        writer.add_token_types([2, 3, 3] + [1] * (len(TINY_TOKENS) - 3))
    if bos_token_id is not None:
        writer.add_int32("tokenizer.ggml.bos_token_id", bos_token_id)
    rng = np.random.default_rng(0)
    arrays = {
        "token_embd.weight": rng.standard_normal((len(TINY_TOKENS), 8), dtype=np.float32),
        "output_norm.weight": rng.standard_normal(8, dtype=np.float32),
        **{f"blk.0.{name}.weight": rng.standard_normal(shape, dtype=np.float32) for name, shape in _TINY_BLOCK.items()},
        **(tensors or {}),
    }
    for name, array in arrays.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@contextlib.contextmanager
def address_space_headroom(limit: int) -> Iterator[None]:
    """Let this process map at most ``limit`` more bytes, for the block's duration.

    Only the soft limit is lowered, so it can be put back: a regression that allocates a 7B model then
    fails inside torch instead of taking the machine's memory.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as statm:
        mapped = int(statm.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _build_refused(source: Path, tmp_path: Path) -> SourceError:
    """Build ``source`` with the real entry point; return the typed error after checking that nothing but the
    failed build's log is left beside OUT."""
    from edgekit.pipeline import build, failed_log_path

    builds = tmp_path / "builds"
    builds.mkdir()
    with address_space_headroom(4096 * MiB), pytest.raises(SourceError) as refused:
        build(source, builds / "pkg", progress=False, evaluation=None)
    assert set(builds.iterdir()) <= {failed_log_path(builds / "pkg")}
    message = str(refused.value)
    assert message.startswith(f"{source}: ") and "\n" not in message
    assert refused.value.exit_code == 2
    return refused.value


def test_a_gguf_without_tokenizer_metadata_is_refused_before_the_build(tmp_path: Path) -> None:
    source = write_tiny_gguf(tmp_path / "no-tokenizer.gguf", tokenizer_model=None)
    error = _build_refused(source, tmp_path)
    assert isinstance(error, CorruptFileError)
    assert "has no tokenizer metadata (tokenizer.ggml.*)" in str(error)
    assert "tokenizer.ggml.model and tokenizer.ggml.tokens missing" in str(error)


@pytest.mark.parametrize(
    ("case", "options", "phrase"),
    [
        # transformers' default block count (Llama-2-7B's 32) is refused against the file's one layer first
        ("no-hyperparameters", {"hyperparameters": False}, "its metadata declares 32 layers but the file holds"),
        ("wider-than-its-tensors", {"feed_forward_length": 1 << 20}, "but the file holds only 792"),
    ],
)
def test_metadata_declaring_a_bigger_model_than_the_file_is_refused_before_allocating(
    tmp_path: Path, case: str, options: dict, phrase: str
) -> None:
    """transformers would fill the gaps with defaults (Llama-2-7B's shapes) and random weights."""
    error = _build_refused(write_tiny_gguf(tmp_path / f"{case}.gguf", **options), tmp_path)
    assert isinstance(error, CorruptFileError)
    assert phrase in str(error)


def test_metadata_transformers_cannot_use_is_one_line(tmp_path: Path) -> None:
    source = write_tiny_gguf(tmp_path / "bogus-tokenizer.gguf", tokenizer_model="bogus")
    error = _build_refused(source, tmp_path)
    assert "transformers cannot import this GGUF file (ValueError: " in str(error)
    assert "'bogus'" in str(error)


def test_a_block_count_past_any_real_model_is_refused_before_the_model_is_laid_out(tmp_path: Path) -> None:
    started = time.monotonic()
    error = _build_refused(write_tiny_gguf(tmp_path / "deep.gguf", block_count=2**32 - 1), tmp_path)
    assert "its metadata gives 'num_hidden_layers' is 4294967295" in str(error)
    assert time.monotonic() - started < 60  # laying out 4 billion layers would not end


@pytest.mark.parametrize(
    ("case", "options", "phrase"),
    [
        ("no-layers", {"block_count": 0}, "'num_hidden_layers' is 0"),
        (
            "a-layer-left-out",
            {"tensors": {f"blk.1.{n}.weight": np.ones(shape, np.float32) for n, shape in _TINY_BLOCK.items()}},
            "its metadata declares 1 layers but the file holds tensors of layers 0..1 (2 of them)",
        ),
        (
            "a-bias-left-out",
            {"tensors": {"blk.0.attn_q.bias": np.full(8, 5.0, np.float32)}},
            "holds tensor 'blk.0.attn_q.bias', which the model its metadata describes has no place for",
        ),
        (
            "transposed-same-size",
            {"tensors": {"blk.0.ffn_gate.weight": np.ones((8, 16), np.float32)}},
            "tensor 'blk.0.ffn_gate.weight' has shape [8, 16] where the model its metadata describes has [16, 8]",
        ),
        (
            "flat-embedding",
            {"tensors": {"token_embd.weight": np.ones(len(TINY_TOKENS) * 8, np.float32)}},
            "tensor 'token_embd.weight' has shape [128] where",
        ),
        ("negative-bos", {"bos_token_id": -2}, "tokenizer.ggml.bos_token_id is -2; a token id is never negative"),
    ],
)
def test_a_file_whose_tensors_are_not_the_model_its_metadata_describes_is_refused(
    tmp_path: Path, case: str, options: dict, phrase: str
) -> None:
    """Each of these was built without a word before: layers or a bias dropped, a matrix reshaped to fit."""
    error = _build_refused(write_tiny_gguf(tmp_path / f"{case}.gguf", **options), tmp_path)
    assert isinstance(error, CorruptFileError)
    assert phrase in str(error)


def test_the_tiny_gguf_builds_as_written(tmp_path: Path) -> None:
    """The file the refusals above start from imports (so each refusal is about its one change)."""
    from edgekit.sources.gguf_import import import_gguf

    result = import_gguf(write_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "hf")
    assert result.config["num_hidden_layers"] == 1


def test_metadata_arrays_are_bounded_by_the_file_size(tmp_path: Path) -> None:
    """gguf's reader makes a Python object of every array element: a 1 MB file of a million bytes in an array
    took 18 s and 700 MB before."""
    count = (1 << 20) + 1
    many = kv("tokenizer.ggml.token_type", ARRAY, struct.pack("<IQ", 0, count) + bytes(count))
    path = tmp_path / "arrays.gguf"
    path.write_bytes(gguf_bytes(kvs=[ARCH, many]))
    with pytest.raises(CorruptFileError, match="its metadata arrays hold over 1,048,576 elements"):
        read_gguf_header(path)


def test_an_architecture_name_of_over_4_kib_is_an_unknown_architecture(tmp_path: Path) -> None:
    from edgekit.sources.gguf_import import gguf_architecture

    long_name = kv("general.architecture", STRING, struct.pack("<Q", 5000) + b"\xff" * 5000)
    path = tmp_path / "long-name.gguf"
    path.write_bytes(gguf_bytes(kvs=[long_name]))
    with pytest.raises(UnsupportedArchitectureError, match="GGUF architecture 'unknown' is not supported"):
        gguf_architecture(path)


def test_an_error_in_what_transformers_made_of_the_metadata_names_the_gguf_file(tmp_path: Path) -> None:
    """Not the build's scratch copy of the imported config (gone when the command ends), nor a fix for a folder's
    config.json: the tiny file's heads are 4 wide, which the checks of the imported folder refuse."""
    error = _build_refused(write_tiny_gguf(tmp_path / "narrow-heads.gguf"), tmp_path)
    assert "has a head size of 4" in str(error)
    assert "(in what transformers made of the file's metadata)" in str(error)
    assert "partial" not in str(error) and "a multiple of 16" in str(error)  # the check's own fix is kept


@pytest.mark.parametrize("name", ["rope_freqs.weight", "rope_factors_long.weight"])
def test_rope_scaling_the_import_would_drop_is_refused(tmp_path: Path, name: str) -> None:
    """Llama 3.1+ and Phi-3.5 files keep their rope scaling as tensors transformers' reader leaves out."""
    error = _build_refused(write_tiny_gguf(tmp_path / "scaled.gguf", tensors={name: np.ones(2, np.float32)}), tmp_path)
    assert f"holds '{name}', rope scaling that transformers' GGUF reader drops" in str(error)
    assert "build from the model's Hugging Face folder" in str(error)
