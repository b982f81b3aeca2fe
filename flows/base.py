"""The invertible-layer contract shared by every model family, and conditions.

``forward`` is the normalizing direction (data -> latent), ``inverse`` the generative
one. Both return ``(output, logdet)`` with ``logdet`` of shape ``[batch]``:
log|det d out / d in| of the direction that was run, so that the forward and inverse
log-dets of the same point sum to zero.

Conditions. ``cond`` is None or a mapping of named conditions, handed through
containers untouched so conditional layers need no special path. The names:

* ``"labels"``: class labels ``[B]`` (class-conditional priors, Glow's ``ycond``);
* ``"lowres"``: the low-resolution image a super-resolution flow conditions on;
* ``"features"``: a feature map that conditional layers resize to their own size
  (SRFlow's RRDB features, the hierarchical flow's decoder outputs).

A layer that needs features also accepts the feature map itself as ``cond``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Condition = Any  # Mapping[str, Any] | Tensor (the feature map) | None

LABELS = "labels"
LOWRES = "lowres"
FEATURES = "features"
GUIDANCE = "guidance"  # a sampling call's classifier-free guidance weight w (0: none)
NULL_LABEL = -1  # the null class: a class-conditional model's unconditional member


def zero_logdet(x: Tensor) -> Tensor:
    """A ``[batch]`` log-det accumulator. Kept in float32 or wider even when ``x`` is
    half precision, because log-dets of deep flows are large sums."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.zeros(x.shape[0], device=x.device, dtype=dtype)


def sum_except_batch(x: Tensor) -> Tensor:
    return x.flatten(1).sum(dim=1)


def at_least_float32(x: Tensor) -> Tensor:
    """Upcast half precision to float32 and leave float32/float64 alone: the fragile
    numerics (scales, log-dets, priors) never run in bf16/fp16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def condition_value(cond: Condition, name: str) -> Any:
    """``cond[name]``, or None when ``cond`` does not carry it. A bare tensor is the
    feature map."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond if name == FEATURES else None
    return cond.get(name)


def drop_labels(cond: Condition, probability: float) -> Condition:
    """``cond`` with each label replaced by :data:`NULL_LABEL` with ``probability``:
    classifier-free guidance's label dropout (Ho & Salimans 2022), which trains the
    unconditional model as the null class of the conditional one."""
    labels = condition_value(cond, LABELS)
    if not probability or labels is None:
        return cond
    dropped = torch.rand(labels.shape, device=labels.device) < probability
    return with_condition(cond, **{LABELS: torch.where(dropped, torch.full_like(labels, NULL_LABEL), labels)})


def check_labels(labels: Tensor, num_classes: int) -> Tensor:
    """``labels``, after a device-side check that each is a class of ``[0, num_classes)``
    or :data:`NULL_LABEL`: a label equal to ``num_classes`` would otherwise index the
    null class's row of an embedding, silently. The check does not read the labels back
    to the host (``torch._assert_async``): a compiled step keeps one graph and a GPU step
    does not wait on it; the error still names the range."""
    inside = ((labels >= NULL_LABEL) & (labels < num_classes)).all()
    torch._assert_async(inside, f"class labels must lie in [0, {num_classes}) or be {NULL_LABEL} (the null class); "
                                "check the data's class count against the model's num_classes")
    return labels


def guided(conditional: Tensor, null: Tensor, weight: float) -> Tensor:
    """Classifier-free guidance of a parameter (a shift, a log-scale, a prior's mean):
    ``conditional + w (conditional - null)``; w = 0 is the conditional one."""
    return conditional + weight * (conditional - null) if weight else conditional


GuidanceRule = Literal["cfg", "starflow"]
GuidanceSchedule = Literal["constant", "annealed"]
GUIDANCE_RULES, GUIDANCE_SCHEDULES = get_args(GuidanceRule), get_args(GuidanceSchedule)


@dataclass(frozen=True)
class Guidance:
    """How a sampling call guides a class-conditional model (``cond["guidance"]``: this,
    or a bare weight, which takes the model's other settings).

    * ``weight`` w >= 0; 0 is the unguided sampler, exactly.
    * ``rule``: how the conditional Gaussian (mean mu_c, scale sigma_c) of each step and
      the unconditional one (mu_u, sigma_u) combine. ``cfg``: mean and log-scale each
      ``c + w (c - u)`` (Ho & Salimans 2022; TarFlow sec. 2.4, ml-tarflow's
      ``reverse``). ``starflow``: the Gaussian of (1 + w) log p_c - w log p_u (STARFlow,
      Gu et al. 2025; ml-starflow's ``guidance``): sigma = sigma_c / sqrt(1 + w - w s),
      mu = ((1 + w) mu_c - w s mu_u) / (1 + w - w s), s = min(sigma_c / sigma_u, 1)^2
      (the clip keeps the precision positive).
    * ``schedule``: ``constant``, or ``annealed`` along an autoregressive sequence: step i
      of T - 1 guided with (i + 1) / (T - 1) w (ml-tarflow's FID script). A model drawn
      in one Gaussian step (a Glow's class-conditional prior) has no sequence: it is at
      the ramp's end, w.
    * ``attention_temperature``: TarFlow's guidance of a model by itself (ml-tarflow's
      ``attn_temp``): the unconditional pass divides its attention logits by this (< 1
      sharpens). An unconditional TarFlow is guided this way only; 1 leaves the null
      pass as it is.
    """

    weight: float = 0.0
    rule: str = "cfg"
    schedule: str = "constant"
    attention_temperature: float = 1.0

    def __post_init__(self) -> None:
        if not self.weight >= 0.0:
            raise ValueError(f"guidance (the weight w) must be >= 0, got {self.weight}")
        if self.rule not in GUIDANCE_RULES:
            raise ValueError(f"guidance rule must be one of {GUIDANCE_RULES}, got {self.rule!r}")
        if self.schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"guidance schedule must be one of {GUIDANCE_SCHEDULES}, got {self.schedule!r}")
        if not self.attention_temperature > 0.0:
            raise ValueError(f"attention_temperature must be > 0, got {self.attention_temperature}")

    def weight_at(self, step: int, steps: int) -> float:
        """w at step ``step`` (0-based) of an autoregressive sequence of ``steps`` guided steps."""
        return self.weight * (step + 1) / steps if self.schedule == "annealed" else self.weight

    def combine(self, mean: Tensor, log_std: Tensor, null_mean: Tensor, null_log_std: Tensor,
                weight: float | None = None) -> tuple[Tensor, Tensor]:
        """The guided (mean, log-scale) of one Gaussian step, by :attr:`rule`, at ``weight``
        (default: :attr:`weight`)."""
        w = self.weight if weight is None else weight
        if not w:
            return mean, log_std
        if self.rule == "cfg":
            return guided(mean, null_mean, w), guided(log_std, null_log_std, w)
        s = torch.exp(2.0 * torch.clamp(log_std - null_log_std, max=0.0))
        precision = 1.0 + w - w * s
        return ((1.0 + w) * mean - w * s * null_mean) / precision, log_std - 0.5 * torch.log(precision)


def guidance_of(cond: Condition) -> Guidance:
    """The :class:`Guidance` a condition names (a bare weight: the cfg rule, constant)."""
    value = condition_value(cond, GUIDANCE)
    if value is None:
        return Guidance()
    return value if isinstance(value, Guidance) else Guidance(weight=float(value))


def with_condition(cond: Condition, **named: Any) -> dict[str, Any]:
    """A copy of ``cond`` (None, a mapping, or a feature map) with ``named`` entries
    added or replaced; entries given as None are left out."""
    if cond is None:
        merged: dict[str, Any] = {}
    elif isinstance(cond, Tensor):
        merged = {FEATURES: cond}
    else:
        merged = dict(cond)
    merged.update({k: v for k, v in named.items() if v is not None})
    return merged


def resize_features(features: Tensor, size: tuple[int, int]) -> Tensor:
    """Bring conditioning features to a layer's spatial size (no-op when equal).
    Shrinking averages over each block (``area``), so no feature is skipped the way
    bilinear sampling at a factor >= 2 would skip them; growing is bilinear."""
    size = tuple(int(s) for s in size)
    if tuple(features.shape[-2:]) == size:
        return features
    if size[0] <= features.shape[-2] and size[1] <= features.shape[-1]:
        return F.interpolate(features, size=size, mode="area")
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


def condition_features(cond: Condition, size: tuple[int, int], who: str) -> Tensor:
    """The feature map of ``cond`` resized to ``size``; a clear error when missing."""
    features = condition_value(cond, FEATURES)
    if features is None:
        raise ValueError(f"{who} is conditional: pass cond with a feature map "
                         f"(cond={{'{FEATURES}': tensor}} or the tensor itself)")
    return resize_features(features, size)


def concat_features(x: Tensor, cond: Condition, who: str) -> Tensor:
    """``x`` with the condition's feature map (resized to x) appended as channels: the
    input of a conditional network (seed 000 eq. 2.18)."""
    features = condition_features(cond, x.shape[-2:], who)
    return torch.cat([x, features.to(x.dtype)], dim=1)


class Bijection(nn.Module):
    """Base class of every invertible layer. Subclasses implement both directions."""

    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def inverse(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement inverse")

    def replay(self, y: Tensor, cond: Condition = None):
        """For backprop without stored activations (``flows/reversible.py``): from this
        layer's output ``y``, ``(x, leaves, (y_again, logdet), input_gradient)``: the input
        ``x`` (no graph), tensors ``leaves`` that require grad, the forward pass recomputed
        from them with a graph, and a function turning the leaves' gradients into the
        gradient with respect to ``x``. This default inverts, then runs ``forward`` again;
        a layer may share work between the two (the couplings evaluate their network
        once)."""
        with torch.no_grad():
            x = self.inverse(y, cond)[0]
        leaf = x.detach().requires_grad_(True)
        return x, [leaf], self(leaf, cond), lambda grads: grads[0]


class FlowSequential(Bijection):
    """Composition of bijections; the condition is passed to every layer."""

    def __init__(self, *layers: Bijection) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        logdet = zero_logdet(x)
        for layer in self.layers:
            x, step_logdet = layer(x, cond)
            logdet = logdet + step_logdet
        return x, logdet

    def inverse(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        logdet = zero_logdet(z)
        for layer in reversed(self.layers):
            z, step_logdet = layer.inverse(z, cond)
            logdet = logdet + step_logdet
        return z, logdet

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)
