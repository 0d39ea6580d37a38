"""GPTQ's sequential driver: a decoder's layers quantized one at a time over the calibration set.

Layer 0's inputs are captured once; each layer is then quantized with the solver in ``edgekit.quant.gptq``
and its *quantized* outputs feed the next layer, so only one layer's weights and activations are in
memory. Two schedules:

- two passes per layer (the reference code's default): one forward collects every linear's Hessian from
  the unquantized layer, batch by batch, and a second runs the quantized layer to make its outputs. It
  holds one batch's activations at a time.
- one pass per layer (``GPTQConfig.one_pass``): every calibration batch runs through the layer at once,
  each in its own greenlet (a coroutine), and stops at the input of each group of linears sharing an
  input (q/k/v, o, gate/up, down). Once all batches wait there, the group's Hessian is summed over
  them, the group is quantized and the batches go on, so each group computes its outputs once, already
  quantized, from inputs made by the groups quantized before it (the reference code's "true sequential"
  order). It is faster, with the same accuracy, but holds every batch's activations of the layer at once,
  so its peak memory is well above the two-pass schedule's (docs/gptq.md has the measurements).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import greenlet
import torch
from torch import Tensor, nn

from edgekit.quant.gptq import KEPT_DENSE, GPTQConfig, HessianAccumulator, Progress, QuantizedWeight, quantize_weight
from edgekit.sources.meta_model import StopForward, capture_layer_arguments, decoder_layers, return_freed_memory


def _capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, calibration: Tensor, batch_size: int
) -> tuple[list[Tensor], list[dict[int, dict[str, Any]]]]:
    """Layer 0's inputs per calibration batch, and every layer's keyword arguments per batch size."""
    calls = ({"input_ids": calibration[s : s + batch_size]} for s in range(0, calibration.shape[0], batch_size))
    return capture_layer_arguments(model, layers, calls, keep_inputs=True)


def _layer_output(output: Any) -> Tensor:
    """The hidden states a decoder layer returned (transformers 5 returns a tensor, older ones a tuple)."""
    return output[0] if isinstance(output, tuple) else output


class _HessianCollector:
    """Forward pre-hooks on a layer's linears that accumulate each distinct input's Hessian.

    Linears fed the very same tensor in a forward (q/k/v, gate/up) share one Hessian, accumulated once
    and solved as one stacked matrix. After the first batch the hook of the layer's last linear ends the
    forward early: what follows it only makes the layer's output, which this pass does not need.
    """

    def __init__(self, linears: dict[str, nn.Linear]) -> None:
        self.linears = linears
        self.leader: dict[str, str] = {}  # module name -> the module whose Hessian it shares
        self.hessians: dict[str, HessianAccumulator] = {}
        self.first_batch = True
        self._calls: list[tuple[str, Tensor]] = []  # the first batch's calls, in execution order
        self._groups: list[list[str]] = []  # learnt from them once the first batch ends
        self._last = ""  # the last linear called: after the first batch the forward stops at it
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            inputs = args[0]
            if self.first_batch:
                self._calls.append((name, inputs))
                self.leader[name] = next(group[0] for group in _group_by_input(self._calls) if name in group)
            if self.leader[name] == name:
                if name not in self.hessians:
                    self.hessians[name] = HessianAccumulator(inputs.shape[-1])
                self.hessians[name].add(inputs)
            if not self.first_batch and name == self._last:
                raise StopForward

        return hook

    def end_batch(self) -> None:
        """Forget this batch's tensors; the grouping and order learnt on the first batch stay."""
        if self.first_batch:
            self._groups = _group_by_input(self._calls)
            self._last = self._calls[-1][0]
        self.first_batch = False
        self._calls.clear()

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()

    def groups(self) -> dict[str, list[str]]:
        """Leader -> the modules (leader first, in execution order) that share its Hessian."""
        return {group[0]: group for group in self._groups}


def _group_by_input(calls: list[tuple[str, Tensor]]) -> list[list[str]]:
    """Linears in the order they were called, grouped by the very tensor each was handed: q/k/v share one
    input, as do gate/up, so they share one Hessian and are solved as one stacked weight."""
    groups: list[list[str]] = []
    seen: list[Tensor] = []
    for name, tensor in calls:
        match = next((index for index, other in enumerate(seen) if other is tensor), None)
        if match is None:
            seen.append(tensor)
            groups.append([name])
        else:
            groups[match].append(name)
    return groups


def _quantize_group(
    linears: dict[str, nn.Linear], members: list[str], hessian: Tensor, config: GPTQConfig
) -> dict[str, QuantizedWeight]:
    """Solve the linears ``members`` that share ``hessian`` as one stacked weight (rows are independent
    given H) and put each one's dequantized part in place of its weight."""
    stacked = torch.cat([linears[name].weight for name in members], dim=0)
    quantized = quantize_weight(stacked, hessian, config)
    del stacked, hessian
    results: dict[str, QuantizedWeight] = {}
    row = 0
    for name in members:
        module = linears[name]
        part = quantized.rows(row, row + module.out_features)
        row += module.out_features
        module.weight.data = part.dequantized.to(module.weight.dtype)
        results[name] = part
    return results


class _LayerPause:
    """What a calibration batch's run of a decoder layer reports when it stops at a linear's input."""

    def __init__(self, leader: str) -> None:
        self.leader = leader


def _learn_groups(
    layer: nn.Module, linears: dict[str, nn.Linear], hidden: Tensor, kwargs: dict[str, Any]
) -> list[list[str]]:
    """The layer's linears in execution order, grouped by the input tensor they share (q/k/v, gate/up).

    Learnt by running one calibration batch through the layer unchanged: a hook per linear records the
    order and which linears are handed the very same tensor.
    """
    order: list[tuple[str, Tensor]] = []

    def record(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            order.append((name, args[0]))

        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in linears.items()]
    try:
        layer(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(linears) - {name for name, _ in order})
    if missing:
        raise ValueError(f"GPTQ: the decoder layer's forward never calls {', '.join(missing)}")
    return _group_by_input(order)


class _LayerPass:
    """Runs one decoder layer over every calibration batch at once, stopping at each linear group's input.

    Each batch runs in its own greenlet (a coroutine with its own stack) through the unmodified
    transformers layer. A pre-hook on a group's first linear keeps the batch's input and suspends the
    batch; once every batch is suspended there, the group's Hessian is summed over those inputs, the group
    is quantized (weights replaced by the dequantized ones) and the batches resume: the group computes its
    outputs, now quantized, exactly once. So one pass over the calibration set both collects every Hessian and makes
    the quantized layer's outputs, and each group sees the inputs of the groups quantized before it (the
    reference code's "true sequential" order).
    """

    def __init__(
        self, groups: list[list[str]], linears: dict[str, nn.Linear], config: GPTQConfig, clock: dict[str, float]
    ) -> None:
        self.linears, self.config, self.clock = linears, config, clock
        self.results: dict[str, QuantizedWeight] = {}
        """Module name -> its quantized weight, filled as the groups are quantized."""
        self.leaders = {group[0]: group for group in groups}
        self.done: set[str] = set()
        self.waiting: list[Tensor] = []  # the inputs of the batches suspended at the current group
        self._handles = [linears[leader].register_forward_pre_hook(self._pause_at(leader)) for leader in self.leaders]

    def _pause_at(self, leader: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if leader in self.done:
                return
            # The input stays alive anyway while the batch waits here: keep a reference, no copy.
            self.waiting.append(args[0])
            parent = greenlet.getcurrent().parent
            assert parent is not None
            parent.switch(_LayerPause(leader))

        return hook

    def run(
        self,
        layer: nn.Module,
        inputs: list[Tensor],
        kwargs: dict[int, dict[str, Any]],
        *,
        last: bool,
    ) -> None:
        """Run ``layer`` over ``inputs`` (replaced by the layer's outputs), quantizing each group on the way.

        For the ``last`` layer the outputs are not made: once its last group is quantized the runs stop.
        """
        runs = [greenlet.greenlet(layer) for _ in inputs]
        arguments: list[tuple[Tensor, dict[str, Any]] | None] = [(hidden, kwargs[hidden.shape[0]]) for hidden in inputs]
        try:
            while True:
                paused: set[str] = set()
                for batch, run in enumerate(runs):
                    if run.dead:
                        continue
                    call = arguments[batch]
                    if call is not None:  # the first switch starts the run; the list lets go of the input
                        arguments[batch] = None
                        inputs[batch] = None  # type: ignore[call-overload]
                        result = run.switch(call[0], **call[1])
                    else:
                        result = run.switch()
                    if isinstance(result, _LayerPause):
                        paused.add(result.leader)
                    else:
                        inputs[batch] = _layer_output(result)
                if not paused:
                    return
                if len(paused) > 1 or any(run.dead for run in runs):
                    raise RuntimeError(f"GPTQ: calibration batches stopped at different linears ({sorted(paused)})")
                leader = paused.pop()
                started = time.perf_counter()
                hessian = HessianAccumulator(self.linears[leader].in_features)
                for tensor in self.waiting:
                    hessian.add(tensor)
                self.waiting.clear()
                return_freed_memory()  # every batch's freed temporaries, before the batches allocate again
                _tick(self.clock, "hessian", started)
                started = time.perf_counter()
                self.results.update(_quantize_group(self.linears, self.leaders[leader], hessian.matrix(), self.config))
                _tick(self.clock, "solve", started)
                self.done.add(leader)
                if last and len(self.done) == len(self.leaders):
                    return
        finally:
            for run in runs:
                if not run.dead:
                    run.throw(greenlet.GreenletExit)
            for handle in self._handles:
                handle.remove()


def _one_pass(
    layer: nn.Module,
    prefix: str,
    linears: dict[str, nn.Linear],
    inputs: list[Tensor],
    kwargs: dict[int, dict[str, Any]],
    config: GPTQConfig,
    clock: dict[str, float],
    last: bool,
    layouts: dict[tuple[Any, ...], list[list[str]]],
) -> dict[str, QuantizedWeight]:
    """The one-pass schedule (``_LayerPass``) over ``layer``, whose module name is ``prefix``. ``layouts``
    caches each kind of layer's grouping of linears (names relative to the layer), learnt on its first."""
    # Layers of one kind share their grouping; a hybrid model (Qwen3.5) has two kinds.
    kind = (type(layer), tuple(name[len(prefix) :] for name in linears))
    if kind not in layouts:
        learnt = _learn_groups(layer, linears, inputs[0], kwargs[inputs[0].shape[0]])
        layouts[kind] = [[name[len(prefix) :] for name in group] for group in learnt]
    groups = [[prefix + suffix for suffix in group] for group in layouts[kind]]
    layer_pass = _LayerPass(groups, linears, config, clock)
    started = time.perf_counter()
    inside = clock.get("hessian", 0.0) + clock.get("solve", 0.0)
    layer_pass.run(layer, inputs, kwargs, last=last)
    inside = clock.get("hessian", 0.0) + clock.get("solve", 0.0) - inside
    clock["forward"] = clock.get("forward", 0.0) + time.perf_counter() - started - inside
    return layer_pass.results


def _two_passes(
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    inputs: list[Tensor],
    kwargs: dict[int, dict[str, Any]],
    config: GPTQConfig,
    clock: dict[str, float],
    last: bool,
) -> dict[str, QuantizedWeight]:
    """The reference schedule: Hessians from the unquantized layer, batch by batch, then the quantized
    layer rerun to write its outputs over ``inputs`` (not for the ``last`` layer: they feed nothing)."""
    collector = _HessianCollector(linears)
    started = time.perf_counter()
    try:
        for hidden in inputs:
            with contextlib.suppress(StopForward):
                layer(hidden, **kwargs[hidden.shape[0]])
            collector.end_batch()
    finally:
        collector.remove()
    return_freed_memory()
    _tick(clock, "hessian_forward", started)

    started = time.perf_counter()
    results: dict[str, QuantizedWeight] = {}
    for leader, members in collector.groups().items():
        results.update(_quantize_group(linears, members, collector.hessians.pop(leader).matrix(), config))
    _tick(clock, "solve", started)

    started = time.perf_counter()
    if not last:  # the last layer's outputs feed nothing GPTQ quantizes
        for batch, hidden in enumerate(inputs):
            inputs[batch] = _layer_output(layer(hidden, **kwargs[hidden.shape[0]]))
    _tick(clock, "output_forward", started)
    return results


def _quantized_linears(layer: nn.Module, names: dict[int, str]) -> dict[str, nn.Linear]:
    """The linears of ``layer`` GPTQ quantizes, by module name (the registry's kept-dense ones excluded)."""
    return {
        names[id(m)]: m for m in layer.modules() if isinstance(m, nn.Linear) and not names[id(m)].endswith(KEPT_DENSE)
    }


@contextlib.contextmanager
def _evaluating_on_all_cores(model: nn.Module) -> Iterator[None]:
    """The model in eval mode and torch on every core this process may use; both put back after."""
    threads, was_training = torch.get_num_threads(), model.training
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    model.eval()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)


def iter_gptq_layers(
    model: nn.Module,
    calibration: Tensor,
    config: GPTQConfig,
    *,
    batch_size: int = 4,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
    release: bool = False,
    before_layer: Callable[[int, nn.Module], None] | None = None,
) -> Iterator[tuple[nn.Module, dict[str, QuantizedWeight]]]:
    """GPTQ the decoder layers of ``model`` one at a time, yielding ``(layer, {module name: weight})``.

    ``calibration`` is [samples, seq_len] int64 token ids (sampling them, seeded, is the caller's job).
    Layer 0's inputs are captured once; then each layer's Hessians are accumulated from its inputs, its
    linears quantized (``weight`` replaced by the dequantized weight) and the *quantized* layer's outputs,
    written over its inputs batch by batch, feed the next layer: in two passes per layer, one batch's
    activations at a time, or with ``config.one_pass`` in one pass holding every batch's (see the module
    docstring). Embeddings and the LM head are left alone. Load the model in
    float32; attention runs with whatever implementation the model was loaded with (sdpa is the fast one
    on CPU).

    With ``release``, each layer's tensors are moved to the meta device once the caller has taken what it
    needs from the yielded layer, so the model shrinks as GPTQ proceeds (and cannot be run afterwards).
    ``before_layer(index, layer)`` runs after layer 0's inputs are captured and before each layer is
    quantized: a model whose layers wait on disk loads them there.
    With ``timings``, the seconds spent in each phase are added to it: capture, then hessian_forward,
    solve, output_forward (two passes) or forward, hessian, solve (one pass).
    """
    if calibration.dim() != 2 or calibration.dtype != torch.int64:
        raise ValueError("calibration must be an int64 tensor of token ids shaped [samples, seq_len]")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    layers = decoder_layers(model)
    names = {id(module): name for name, module in model.named_modules()}
    clock = timings if timings is not None else {}
    with _evaluating_on_all_cores(model), torch.no_grad():
        started = time.perf_counter()
        inputs, layer_kwargs = _capture_layer_inputs(model, layers, calibration, batch_size)
        _tick(clock, "capture", started)
        layouts: dict[tuple[Any, ...], list[list[str]]] = {}
        for index, layer in enumerate(layers):
            if before_layer is not None:
                before_layer(index, layer)
            last = index == len(layers) - 1
            linears = _quantized_linears(layer, names)
            if config.one_pass:
                name = names[id(layer)]
                results = _one_pass(layer, name, linears, inputs, layer_kwargs[index], config, clock, last, layouts)
            else:
                results = _two_passes(layer, linears, inputs, layer_kwargs[index], config, clock, last)
            if progress is not None:
                progress(f"GPTQ layer {index + 1}/{len(layers)}: {len(linears)} linears")
            yield layer, results
            if release:
                layer.to("meta")
            return_freed_memory()


def gptq_quantize_model(
    model: nn.Module,
    calibration: Tensor,
    config: GPTQConfig,
    *,
    batch_size: int = 4,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, QuantizedWeight]:
    """GPTQ every ``nn.Linear`` of every decoder layer of ``model`` in place (see ``iter_gptq_layers``).

    Returns module name (as in ``model.named_modules()``) -> ``QuantizedWeight``.
    """
    results: dict[str, QuantizedWeight] = {}
    for _layer, quantized in iter_gptq_layers(
        model, calibration, config, batch_size=batch_size, progress=progress, timings=timings
    ):
        results.update(quantized)
    return results


def _tick(clock: dict[str, float], phase: str, started: float) -> None:
    clock[phase] = clock.get(phase, 0.0) + time.perf_counter() - started
