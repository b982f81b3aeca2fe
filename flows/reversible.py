"""Training memory that does not grow with depth: compositions of bijections that keep
no per-layer activations for the backward pass.

* :class:`ReversibleSequential` (``memory_efficient: true``): the forward pass runs
  without building a graph and keeps only the composition's *output*. The backward pass
  walks the layers from last to first; for each one it recomputes the layer's input
  from its output with the layer's own inverse (an invertible network needs no stored
  activations: Gomez et al. 2017, "The Reversible Residual Network"), re-runs that one layer with a graph and back-propagates through it. The gradients of
  the log-det (whose gradient reaches every parameter) are included. Memory is then one
  layer's activations plus each composition's output, whatever the number of layers;
  the price is one inverse and one extra forward per layer.
* :class:`CheckpointedSequential` (``activation_checkpointing: true``): the familiar
  alternative; every layer is a ``torch.utils.checkpoint`` segment that keeps its input
  and re-runs its forward in the backward pass. Memory still grows with depth (one
  input per layer) but by far less than the full graph.

Both give the same gradients as :class:`~flows.base.FlowSequential` up to floating
point (tests check 1e-5 relative). The reversible mode reconstructs inputs numerically,
so it relies on the layers being well-conditioned inverses of each other (under bf16
autocast the reconstruction inherits bf16 rounding, as the forward pass does).

Conditions (``cond``) may carry tensors that need gradients (SRFlow's RRDB features):
they are passed to the autograd function as inputs and get their gradients from every
layer.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from flows.base import Condition, FlowSequential, zero_logdet


def _split_condition(cond: Condition) -> tuple[list[Tensor], Callable[[list[Tensor]], Condition]]:
    """The tensors inside ``cond`` and a function that rebuilds ``cond`` around
    replacements for them (so they can be autograd inputs)."""
    if isinstance(cond, Tensor):
        return [cond], lambda tensors: tensors[0]
    if cond is None:
        return [], lambda tensors: None
    keys = [k for k, v in cond.items() if isinstance(v, Tensor)]

    def rebuild(tensors: list[Tensor]) -> dict[str, Any]:
        merged = dict(cond)
        merged.update(zip(keys, tensors))
        return merged
    return [cond[k] for k in keys], rebuild


def _flattened(sequence: FlowSequential) -> list:
    """The leaf layers of nested compositions, in order (a flow step is itself a
    composition; its coupling's own replay is what saves the work)."""
    layers = []
    for layer in sequence.layers:
        layers.extend(_flattened(layer) if type(layer) is FlowSequential else [layer])
    return layers


class _ReversibleFunction(torch.autograd.Function):
    """Forward: ``layers`` without a graph, saving only the output. Backward: invert and
    re-run one layer at a time. Inputs after ``x``: the condition's tensors, then the
    trainable parameters (so autograd hands their gradients back through us)."""

    @staticmethod
    def forward(ctx, layers: FlowSequential, rebuild, num_cond: int, x: Tensor, *tensors: Tensor):
        cond_tensors = list(tensors[:num_cond])
        y, logdet = FlowSequential.forward(layers, x, rebuild(cond_tensors))
        ctx.layers, ctx.rebuild, ctx.num_cond = layers, rebuild, num_cond
        ctx.params = tensors[num_cond:]
        ctx.autocast = {device: (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
                        for device in ("cpu", "cuda") if device != "cuda" or torch.cuda.is_available()}
        ctx.save_for_backward(y, *cond_tensors)
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_logdet: Tensor):
        y, *cond_tensors = ctx.saved_tensors
        cond_inputs = [c.detach().requires_grad_(c.requires_grad) for c in cond_tensors]
        cond = ctx.rebuild(cond_inputs)
        wanted_cond = [c for c in cond_inputs if c.requires_grad]
        param_grads: dict[int, Tensor] = {}
        cond_grads: dict[int, Tensor] = {}
        if grad_y is None:
            grad_y = torch.zeros_like(y)
        if grad_logdet is None:
            grad_logdet = torch.zeros(y.shape[0], device=y.device, dtype=torch.promote_types(y.dtype, torch.float32))
        y = y.detach()
        for layer in reversed(_flattened(ctx.layers)):
            # Recover the layer's input from its output and replay its forward pass with
            # a graph (Bijection.replay; the couplings share one network evaluation).
            with torch.enable_grad(), _autocast_as(ctx.autocast):
                x, leaves, (y_again, logdet), input_gradient = layer.replay(y, cond)
            params = [p for p in layer.parameters() if p.requires_grad]
            outputs, grads_out = [y_again], [grad_y]
            if logdet.requires_grad:
                outputs.append(logdet)
                grads_out.append(grad_logdet.to(logdet.dtype))
            grads = torch.autograd.grad(outputs, [*leaves, *params, *wanted_cond], grads_out, allow_unused=True)
            grad_y = input_gradient(list(grads[:len(leaves)]))
            grads = grads[len(leaves):]
            for p, g in zip(params, grads[:len(params)]):
                if g is not None:
                    param_grads[id(p)] = g if id(p) not in param_grads else param_grads[id(p)] + g
            for c, g in zip(wanted_cond, grads[len(params):]):
                if g is not None:
                    cond_grads[id(c)] = g if id(c) not in cond_grads else cond_grads[id(c)] + g
            y = x.detach()
            del x, leaves, y_again, logdet, outputs, grads
        return (None, None, None, grad_y, *(cond_grads.get(id(c)) for c in cond_inputs),
                *(param_grads.get(id(p)) for p in ctx.params))


class _autocast_as:
    """Autocast as it was when the forward pass ran (so the replay computes what the
    forward pass did)."""

    def __init__(self, state: dict[str, tuple[bool, torch.dtype]]) -> None:
        self.state = state

    def __enter__(self):
        self._contexts = [torch.autocast(device, dtype=dtype, enabled=enabled)
                          for device, (enabled, dtype) in self.state.items()]
        for context in self._contexts:
            context.__enter__()

    def __exit__(self, *exc):
        for context in reversed(self._contexts):
            context.__exit__(*exc)


class ReversibleSequential(FlowSequential):
    """A :class:`~flows.base.FlowSequential` that stores no activations for backward:
    each layer's input is recomputed from its output with its inverse (see the module
    docstring). Without gradients (evaluation, sampling) it is a plain composition."""

    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        params = [p for p in self.parameters() if p.requires_grad]
        cond_tensors, rebuild = _split_condition(cond)
        needs_graph = torch.is_grad_enabled() and (
            x.requires_grad or params or any(c.requires_grad for c in cond_tensors))
        if not needs_graph:
            return super().forward(x, cond)
        return _ReversibleFunction.apply(self, rebuild, len(cond_tensors), x, *cond_tensors, *params)


class CheckpointedSequential(FlowSequential):
    """A :class:`~flows.base.FlowSequential` whose layers are activation-checkpointing
    segments: each keeps its input and re-runs its forward in the backward pass."""

    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        if not torch.is_grad_enabled():
            return super().forward(x, cond)
        logdet = zero_logdet(x)
        for layer in self.layers:
            x, step_logdet = checkpoint(layer, x, cond, use_reentrant=False)
            logdet = logdet + step_logdet
        return x, logdet


def sequential_for(memory_efficient: bool, activation_checkpointing: bool) -> type[FlowSequential]:
    """The composition class of a flow's scales for its memory options."""
    if memory_efficient and activation_checkpointing:
        raise ValueError("choose one of memory_efficient (reversible recomputation) and activation_checkpointing")
    if memory_efficient:
        return ReversibleSequential
    return CheckpointedSequential if activation_checkpointing else FlowSequential
