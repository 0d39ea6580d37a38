"""Runtime levers of issue #17, side by side: each one a change to a package's session options or graph.

Run: python benchmarks/bench_levers.py PACKAGE [--variant NAME] [--rounds 5] [--gen 64]
     [--prefill-chunks 64,128,256] [--no-levers] [--only WORD] [--against PKG[:VARIANT]]...

Most levers are the package's variant loaded with one onnxruntime-genai config overlay on top of what
``edgekit.load`` sets (one intra-op thread per physical core, one inter-op thread, the prompt in pieces of at
most ``DEFAULT_PREFILL_CHUNK`` tokens: tables measured before that default ran prompts in one pass); seven are
edited graphs (copies of the package in a temporary folder): the last row of logits expanded to every position
(as packages did before their logits were declared one position), an MLP's gate and up projections in one
MatMulNBits (for packages built before the build did that), the LM head over every position, as the builder
exports it, fp32 compute in every MatMulNBits, (for a recipe with asymmetric formats) each activation's block
means made by one MatMul with a constant averaging matrix, or by one AveragePool, instead of a Reshape and a
ReduceMean, and the compute type chosen by phase: the graph's nodes twice under an If on the input's length,
fp32 compute for a prompt, int8 for a generated token. One more runs prompts on a copy of the graph with
fp32-compute MatMulNBits (held in memory) and generated tokens on the package's graph, two sessions in
onnxruntime-genai's decoder pipeline. All of them stay loaded, and each round times every phase of every lever
once, phase by phase, alternating the levers' order, so they see the same machine state and each follows the
same kind of work. Each lever's model has its own onnxruntime thread pool, whose threads spin for a while
after a run, so with many levers loaded each timing carries some of the others' spinning: ``--only WORD``
compares the default with the matching levers alone. ``--against PKG[:VARIANT]`` adds another package's
variant as a lever (a model built differently, say with other recipe formats).

- decode at depth D: D random prompt tokens, then ``--gen`` tokens, the first excluded (llama-bench's ``tg``);
- prefill of 512 tokens: 512 over the time to the first token (llama-bench's ``pp``).

The table gives medians and each lever's ratio to the default. ``--prefill-chunks`` adds a second table:
the prompt appended to the generator in pieces of at most that many tokens, cut as the runtime cuts them
(onnxruntime-genai runs one decoder pass per piece), against one pass, for 512- and 2048-token prompts.
``edgekit tune`` measures the levers that pay on some machines (threads, the arena, the prompt's pieces)
on the user's own machine and records the winner.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import describe_machine

ARENA_OFF = {"model": {"decoder": {"session_options": {"enable_cpu_mem_arena": False}}}}
LEVERS: dict[str, dict[str, Any]] = {
    "default": {},
    "KV buffer not shared (past_present_share_buffer false)": {"search": {"past_present_share_buffer": False}},
    "CPU memory arena off": ARENA_OFF,
    "memory pattern off": {"model": {"decoder": {"session_options": {"enable_mem_pattern": False}}}},
    "1 intra-op thread": {"model": {"decoder": {"session_options": {"intra_op_num_threads": 1}}}},
}
PHASES = ("decode d0", "decode d512", "decode d2048", "prefill 512")


def _whole_head(model: Any) -> None:
    from edgekit.exporters.last_position import restore_all_positions

    if not restore_all_positions(model):
        raise SystemExit("the variant computes the head over every position already")


def _fp32_compute(model: Any) -> None:
    for node in model.graph.node:
        for attribute in node.attribute:
            if node.op_type == "MatMulNBits" and attribute.name == "accuracy_level":
                attribute.i = 0


def _block_means(graph: Any) -> dict[str, tuple[str, int, list[Any]]]:
    """An asymmetric recipe's block means: each means tensor's activation, block size and the nodes that make
    it (a Reshape and a ReduceMean since commit b01effc, one AveragePool in graphs built before)."""
    from onnx import numpy_helper

    made = {node.output[0]: node for node in graph.node}
    constants = {t.name: t for t in graph.initializer}
    found = {}
    for node in graph.node:
        if node.op_type == "AveragePool":
            size = next(a.ints[0] for a in node.attribute if a.name == "kernel_shape")
            found[node.output[0]] = (node.input[0], size, [node])
        elif node.op_type == "ReduceMean" and made.get(node.input[0]) is not None:
            reshape = made[node.input[0]]
            if reshape.op_type == "Reshape" and reshape.input[1] in constants:
                size = int(numpy_helper.to_array(constants[reshape.input[1]])[-1])
                found[node.output[0]] = (reshape.input[0], size, [reshape, node])
    if not found:
        raise SystemExit("the variant has no block means: pass an asymmetric recipe (--variant int4-recipe)")
    return found


def _means_by_matmul(model: Any) -> None:
    """Each activation's block means (then a Concat with the zero padding) as one MatMul with a constant
    [K, digits * segment] averaging matrix whose padding columns are zero, then a two-input Concat."""
    import numpy as np
    from onnx import helper, numpy_helper

    from edgekit.quant.offset_digits import segment

    graph = model.graph
    means = _block_means(graph)
    dropped = {id(node) for _, _, made in means.values() for node in made}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    nodes = []
    for node in graph.node:
        if id(node) in dropped:
            continue
        if node.op_type == "Concat" and len(node.input) > 1 and node.input[1] in means:
            activation, size, _ = means[node.input[1]]
            count = list(node.input).count(node.input[1])
            width = _reader_k(node.output[0], readers)  # K + count * segment(K / size)
            cols = next(k for k in range(size, width, size) if k + count * segment(k // size, size) == width)
            blocks, seg = cols // size, segment(cols // size, size)
            matrix = np.zeros((cols, count * seg), np.float32)
            for digit in range(count):
                for block in range(blocks):
                    matrix[block * size : (block + 1) * size, digit * seg + block] = 1.0 / size
            name = f"{node.output[0]}_averaging"
            graph.initializer.append(numpy_helper.from_array(matrix, name))
            nodes.append(helper.make_node("MatMul", [activation, name], [f"{name}_means"], name=name))
            node.input[1:] = [f"{name}_means"]
        nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)


def _means_by_average_pool(model: Any) -> None:
    """Each activation's block means by one AveragePool (how recipes made them before commit b01effc)
    instead of a Reshape and a ReduceMean."""
    from onnx import helper

    graph = model.graph
    means = _block_means(graph)
    if any(made[0].op_type == "AveragePool" for _, _, made in means.values()):
        raise SystemExit("the variant's block means are AveragePools already")
    last = {id(made[-1]): (name, activation, size) for name, (activation, size, made) in means.items()}
    dropped = {id(made[0]) for _, _, made in means.values()}
    nodes = []
    for node in graph.node:
        if id(node) in last:
            name, activation, size = last[id(node)]
            node = helper.make_node("AveragePool", [activation], [name], kernel_shape=[size], strides=[size], name=name)
        if id(node) not in dropped:
            nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)


def _reader_k(name: str, readers: dict[str, list[Any]]) -> int:
    """The K of the first MatMulNBits downstream of ``name`` (through the head's last-position Slice)."""
    frontier = [name]
    while frontier:
        ahead = []
        for node in (n for f in frontier for n in readers.get(f, [])):
            if node.op_type == "MatMulNBits":
                return next(a.i for a in node.attribute if a.name == "K")
            ahead.extend(node.output)
        frontier = ahead
    raise SystemExit(f"no MatMulNBits reads {name}")


def _prompts_on_fp32_compute(config: Any, folder: Path) -> bytes:
    """Prompts on a copy of the graph with fp32-compute MatMulNBits, tokens on the package's own graph: two
    sessions in onnxruntime-genai's decoder pipeline. Returns the copy's bytes, which the caller keeps alive
    (genai holds a pointer to them, not a copy)."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    _fp32_compute(model)
    data: bytes = model.SerializeToString()
    config.add_model_data("model_prompt.onnx", data)
    inputs, outputs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]

    def stage(filename: str, prompt: bool) -> dict[str, Any]:
        return {"filename": filename, "inputs": inputs, "outputs": outputs, "run_on_prompt": prompt,
                "run_on_token_gen": not prompt}  # fmt: skip

    pipeline = [{"prompt": stage("model_prompt.onnx", True)}, {"tokens": stage("model.onnx", False)}]
    config.overlay(json.dumps({"model": {"type": "decoder-pipeline", "decoder": {"pipeline": pipeline}}}))
    return data


CONFIG_LEVERS = {"prompts on an fp32-compute copy of the graph (genai pipeline)": _prompts_on_fp32_compute}
_KEPT: list[bytes] = []  # model bytes genai reads in place, alive as long as the process


def _gate_up_fused(model: Any) -> None:
    """Each MLP's gate and up projections (two MatMulNBits reading one input) as one MatMulNBits over both
    weights (their packed codes and scales concatenated along N, folded when the session starts) and a Split:
    the measurement behind ``edgekit/exporters/parallel_matmuls.py``, for packages built before it."""
    from onnx import helper

    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    by_name = {n.name: n for n in graph.node}
    if not any(n.op_type == "MatMulNBits" and "/mlp/gate_proj/" in n.name for n in graph.node):
        raise SystemExit("no separate gate projection: packages built since commit 3159b5f join them already")
    nodes = []
    for node in graph.node:
        if node.op_type == "MatMulNBits" and "/mlp/up_proj/" in node.name:
            continue  # joined into its gate projection below
        if node.op_type == "MatMulNBits" and "/mlp/gate_proj/" in node.name:
            up = by_name[node.name.replace("gate_proj", "up_proj")]
            assert list(up.input[0:1]) == list(node.input[0:1]) and len(node.input) == len(up.input)
            fused, base = f"{node.name}_gate_up", node.name
            joined = [f"{base}_joined{i}" for i in range(1, len(node.input))]
            for i, name in enumerate(joined, start=1):
                nodes.append(helper.make_node("Concat", [node.input[i], up.input[i]], [name], axis=0, name=name))
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            n = attrs["N"]
            attrs["N"] = 2 * n
            nodes.append(helper.make_node("MatMulNBits", [node.input[0], *joined], [f"{fused}_out"], name=fused,
                                          domain="com.microsoft", **attrs))  # fmt: skip
            sizes = f"{fused}_sizes"
            graph.initializer.append(helper.make_tensor(sizes, 7, [2], [n, n]))
            split = [f"{fused}_out", sizes] if opset >= 13 else [f"{fused}_out"]
            extra = {} if opset >= 13 else {"split": [n, n]}
            outputs = [node.output[0], up.output[0]]
            nodes.append(helper.make_node("Split", split, outputs, axis=-1, name=f"{fused}_split", **extra))
            continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _logits_expanded(model: Any) -> None:
    """The last row of logits expanded back to every position, as packages built before the logits were
    declared [batch, 1, vocab] did (onnxruntime-genai then binds and copies a [batch, sequence, vocab] buffer)."""
    from onnx import helper

    graph, prefix = model.graph, "/edgekit/last_position"
    output = next(o for o in graph.output if o.name == "logits")
    dim = output.type.tensor_type.shape.dim[1]
    if not any(n.name == f"{prefix}/Slice" for n in graph.node) or dim.dim_value != 1:
        raise SystemExit("the variant's logits are not one position declared [batch, 1, vocab]")
    for node in graph.node:
        node.output[:] = [f"{prefix}/logits" if name == "logits" else name for name in node.output]
    hidden = next(n for n in graph.node if n.name == f"{prefix}/Slice").input[0]
    graph.node.extend(
        [
            helper.make_node("Shape", [hidden], [f"{prefix}/hidden_shape"], name=f"{prefix}/Shape", end=2),
            helper.make_node("Shape", [f"{prefix}/logits"], [f"{prefix}/vocab"], name=f"{prefix}/ShapeVocab", start=2),
            helper.make_node("Concat", [f"{prefix}/hidden_shape", f"{prefix}/vocab"], [f"{prefix}/shape"], axis=0),
            helper.make_node("Expand", [f"{prefix}/logits", f"{prefix}/shape"], ["logits"], name=f"{prefix}/Expand"),
        ]
    )
    dim.CopyFrom(next(i for i in graph.input if i.name == "input_ids").type.tensor_type.shape.dim[1])


def _compute_by_phase(model: Any) -> None:
    """One graph, two copies of its nodes under an If on the input's length: fp32-compute MatMulNBits for a
    prompt (more than one token), the package's int8 compute for each generated token. The weights stay
    outer-scope initializers that both branches read (stored once)."""
    import copy

    from onnx import TensorProto, helper

    graph = model.graph
    # Small initializers (shapes, axes, norms' weights) move into each branch, where onnxruntime can fold
    # what reads them; the weights, stored outside the graph, stay outer-scope values both branches read.
    local = [t for t in graph.initializer if t.data_location != TensorProto.EXTERNAL and t.ByteSize() < 65536]
    moved = {t.name for t in local}
    kept = [t for t in graph.initializer if t.name not in moved]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    outer = {i.name for i in graph.input} | {t.name for t in kept} | {""}

    def branch(prefix: str, level: int | None) -> Any:
        def renamed(name: str) -> str:
            return name if name in outer else f"{prefix}/{name}"

        nodes = []
        for original in graph.node:
            node = copy.deepcopy(original)
            node.name = f"{prefix}/{node.name}"
            node.input[:] = [renamed(n) for n in node.input]
            node.output[:] = [renamed(n) for n in node.output]
            if node.op_type == "MatMulNBits" and level is not None:
                kept = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])
            nodes.append(node)
        outputs = []
        for output in graph.output:
            info = copy.deepcopy(output)
            info.name = renamed(output.name)
            outputs.append(info)
        initializers = copy.deepcopy(local)
        for tensor in initializers:
            tensor.name = renamed(tensor.name)
        return helper.make_graph(nodes, prefix, [], outputs, initializer=initializers)

    ids = "input_ids"
    switch = [
        helper.make_node("Shape", [ids], ["phase/length"], name="phase/Shape", start=1, end=2),
        helper.make_node("Greater", ["phase/length", "phase/one"], ["phase/prompt"], name="phase/Greater"),
        helper.make_node(
            "If", ["phase/prompt"], [o.name for o in graph.output], name="phase/If",
            then_branch=branch("prompt", 0), else_branch=branch("tokens", None),
        ),
    ]  # fmt: skip
    graph.initializer.append(helper.make_tensor("phase/one", TensorProto.INT64, [1], [1]))
    del graph.node[:]
    graph.node.extend(switch)
    del graph.value_info[:]


def _half_kv_cache(model: Any) -> None:
    """The KV cache in float16: each GroupQueryAttention runs in half precision on float16 copies of its
    activations and rotary tables (Casts onnxruntime folds for the tables), its output cast back."""
    from onnx import TensorProto, helper

    graph = model.graph
    for value in [*graph.input, *graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    nodes: list[Any] = []
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            nodes.append(node)
            continue
        for index in (0, 1, 2, 7, 8):  # query (or packed QKV), key, value, cos cache, sin cache
            if index < len(node.input) and node.input[index]:
                half = f"{node.input[index]}/half/{node.name}"
                nodes.append(helper.make_node("Cast", [node.input[index]], [half], to=TensorProto.FLOAT16,
                                              name=half))  # fmt: skip
                node.input[index] = half
        output, node.output[0] = node.output[0], f"{node.output[0]}/half"
        nodes.extend([node, helper.make_node("Cast", [node.output[0]], [output], to=TensorProto.FLOAT,
                                             name=f"{output}/float")])  # fmt: skip
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]


GRAPH_LEVERS = {
    "KV cache in float16 (GroupQueryAttention in half precision)": _half_kv_cache,
    "logits expanded to every position (as before)": _logits_expanded,
    "gate and up projections in one MatMulNBits": _gate_up_fused,
    "LM head over every position (as exported)": _whole_head,
    "MatMulNBits accuracy level 0 (fp32 compute)": _fp32_compute,
    "block means by MatMul (asymmetric recipes)": _means_by_matmul,
    "block means by AveragePool (asymmetric recipes, as before)": _means_by_average_pool,
    "MatMulNBits compute by phase (If: fp32 for prompts, int8 for tokens)": _compute_by_phase,
}


def graph_copy(package: Path, variant: str | None, into: Path, edit: Any) -> Path:
    """A copy of ``package`` in ``into`` whose variant's graph ``edit`` changed, its manifest rewritten to match."""
    import shutil

    import onnx

    from edgekit.package.manifest import read_manifest, write_manifest
    from edgekit.package.verify import variant_dir

    copy = Path(shutil.copytree(package, into))
    _, folder = variant_dir(copy, read_manifest(copy), variant)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    edit(model)
    onnx.save(model, str(folder / "model.onnx"))
    write_manifest(copy, read_manifest(copy))
    return copy


def load_with(package: Path, variant: str | None, overlay: dict[str, Any], edit: Any = None) -> Any:
    """The package loaded by ``edgekit.load`` with ``overlay`` applied after edgekit's own settings (and
    ``edit(config, folder)`` after that, where given)."""
    import edgekit.runtimes.model as runtime_model

    original = runtime_model._genai_config

    def with_overlay(og: Any, folder: Path, provider: str, strict: bool, runtime: Any) -> Any:
        config = original(og, folder, provider, strict, runtime)
        if overlay:
            config.overlay(json.dumps(overlay))
        if edit is not None:
            _KEPT.append(edit(config, folder))
        return config

    runtime_model._genai_config = with_overlay  # type: ignore[assignment]
    try:
        return runtime_model.load(package, variant=variant, tuned=False)
    finally:
        runtime_model._genai_config = original  # type: ignore[assignment]


def timing(model: Any, phase: str, gen: int, prompts: dict[int, list[int]]) -> float:
    """One measurement of ``phase`` for one lever, in tokens/s."""
    from edgekit.runtimes.bench import time_generation

    if phase == "prefill 512":
        return time_generation(model, prompts[512], 2)[0]
    depth = int(phase.removeprefix("decode d")) or 1
    decode = time_generation(model, prompts[depth], gen if depth < 2048 else gen // 2)[1]
    return float("nan") if decode is None else decode  # the model ended at its first token


def chunked_prefill(model: Any, prompt: list[int], chunk: int | None) -> float:
    """Prompt tokens per second to the first generated token, the prompt appended in pieces of at most ``chunk``."""
    from edgekit.runtimes.generation import GenerationConfig
    from edgekit.runtimes.model import prompt_pieces

    started = time.perf_counter()
    generator = model._og.Generator(model._model, model._params(len(prompt) + 2, GenerationConfig(max_new_tokens=2)))
    for piece in prompt_pieces(prompt, chunk):
        generator.append_tokens(piece)
    generator.generate_next_token()
    return len(prompt) / (time.perf_counter() - started)


def chunk_table(model: Any, prompts: dict[int, list[int]], chunks: list[int], rounds: int) -> None:
    """Print prefill speed per chunk size against one pass, alternating rounds."""
    sizes: list[int | None] = [None, *chunks]
    print(f"\nprefill tokens/s by chunk size, medians of {rounds} alternating rounds (ratio to one pass)\n")
    print("| prompt | one pass | " + " | ".join(f"chunks of {c}" for c in chunks) + " |")
    print("|---|" + "---:|" * len(sizes))
    for length in (512, 2048):
        chunked_prefill(model, prompts[length], None)  # warm-up
        samples: dict[int | None, list[float]] = {size: [] for size in sizes}
        for number in range(rounds):
            for size in sizes if number % 2 == 0 else list(reversed(sizes)):
                samples[size].append(chunked_prefill(model, prompts[length], size))
        one = statistics.median(samples[None])
        cells = [f"{statistics.median(v):.0f} ({statistics.median(v) / one:.2f}x)" for v in samples.values()]
        print(f"| {length} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--prefill-chunks", default="", help="comma-separated chunk sizes for the second table")
    parser.add_argument("--no-levers", action="store_true", help="only the chunk table")
    parser.add_argument("--only", help="only the levers whose name holds this word (and the default)")
    parser.add_argument(
        "--against", action="append", default=[], metavar="PKG[:VARIANT]",
        help="another package's variant as one more lever (a differently built model), repeatable",
    )  # fmt: skip
    args = parser.parse_args()

    from edgekit.runtimes.tuning import machine_class

    print(describe_machine())
    print(f"CPU class: {machine_class()}")
    rng = np.random.default_rng(0)
    prompts = {n: [int(t) for t in rng.integers(100, 30000, size=n)] for n in (1, 512, 2048)}
    chunks = [int(c) for c in args.prefill_chunks.split(",") if c]
    if args.no_levers:
        chunk_table(load_with(args.package, args.variant, {}), prompts, chunks, args.rounds)
        return
    every = [*LEVERS, *CONFIG_LEVERS, *GRAPH_LEVERS]
    chosen = [name for name in every if name == "default" or not args.only or args.only in name]
    models = {name: load_with(args.package, args.variant, LEVERS[name]) for name in chosen if name in LEVERS}
    for name in (n for n in chosen if n in CONFIG_LEVERS):
        models[name] = load_with(args.package, args.variant, {}, CONFIG_LEVERS[name])
    scratch = tempfile.TemporaryDirectory()
    for number, name in enumerate(n for n in chosen if n in GRAPH_LEVERS):
        copy = graph_copy(args.package, args.variant, Path(scratch.name) / str(number), GRAPH_LEVERS[name])
        models[name] = load_with(copy, args.variant, {})
    for other in args.against:
        folder, _, variant = other.rpartition(":") if ":" in other else (other, "", "")
        models[f"package {other}"] = load_with(Path(folder), variant or None, {})
    for model in models.values():
        for phase in PHASES:
            timing(model, phase, 8, prompts)  # warm-up: allocations, prepacking
    samples: dict[str, dict[str, list[float]]] = {name: {phase: [] for phase in PHASES} for name in models}
    for number in range(args.rounds):
        names = list(models) if number % 2 == 0 else list(reversed(models))
        for phase in PHASES:  # phase by phase, every lever in turn: each follows the same kind of work
            for name in names:
                samples[name][phase].append(timing(models[name], phase, args.gen, prompts))
        print(f"round {number + 1}/{args.rounds} done", flush=True)
    medians = {name: {p: statistics.median(v) for p, v in phases.items()} for name, phases in samples.items()}
    base = medians["default"]
    print(f"\ntokens/s, medians of {args.rounds} alternating rounds (ratio to the default)\n")
    print("| lever | " + " | ".join(PHASES) + " |")
    print("|---|" + "---:|" * len(PHASES))
    for name, row in medians.items():
        cells = [f"{row[p]:.1f} ({row[p] / base[p]:.2f}x)" for p in PHASES]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if chunks:
        chunk_table(models["default"], prompts, chunks, args.rounds)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"\n({time.perf_counter() - started:.0f} s)")
