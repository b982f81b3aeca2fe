"""Which time steps the training estimate of a DDPM's bound draws, and their weights
(improved-diffusion keeps its ``resample.py`` apart in the same way): uniform, the
endpoints, or importance sampling by each step's second moment."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

BoundEstimator = Literal["uniform", "endpoints", "importance"]


def all_gathered(x: Tensor) -> Tensor:
    """``x`` of every process concatenated (itself outside a multi-process run): what
    each process adds to the importance sampler's history, so all keep the same."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_world_size() <= 1:
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class TimestepSampler(nn.Module):
    """The time steps of the training estimate of the bound, and their weights.

    The bound is L_T + sum_{t=0}^{T-1} L_t. For any p(t) > 0 on a set S of steps,
    L_t / p(t) with t ~ p is an unbiased estimate of sum_{t in S} L_t. ``kind``:

    * ``"uniform"``: S = all T steps, p = 1/T, the estimate T L_t (DDPM's L_vlb and
      seed 003 Alg. 1). For a flow's latent L_0 is a *continuous* density of z_0 (a few
      hundred nats below zero for a 192-dim latent), so the rare draw t = 0 gives
      T L_0 and the per-image estimate has a standard deviation of tens of bits per
      dim (benchmarks/diffusion_bound_estimators.py).
    * ``"endpoints"``: L_0 is computed for every image (the same denoiser call, the
      batch doubled) and only S = 1..T-1 is sampled uniformly: (T - 1) L_t.
    * ``"importance"``: as endpoints, with p over 1..T-1 proportional to
      sqrt(E[L_t^2]) over the last ``history`` values of each L_t, mixed with
      ``uniform_mix`` of the uniform distribution, and uniform until every step has
      ``history`` values (improved-diffusion's ``LossSecondMomentResampler``, whose
      default 10 and 0.001 these are). The history is training state: the module
      saves it in its checkpoints (:meth:`state` / :meth:`load_state`).
    """

    def __init__(self, timesteps: int, kind: BoundEstimator = "endpoints", history: int = 10,
                 uniform_mix: float = 1e-3) -> None:
        super().__init__()
        if kind not in ("uniform", "endpoints", "importance"):
            raise ValueError(f"bound_estimator must be 'uniform', 'endpoints' or 'importance', got {kind!r}")
        self.timesteps = timesteps
        self.kind = kind
        self.uniform_mix = uniform_mix
        # Not in the state_dict (checkpoints of other estimators load unchanged).
        self.register_buffer("history", torch.zeros(timesteps, history, dtype=torch.float64), persistent=False)
        self.register_buffer("counts", torch.zeros(timesteps, dtype=torch.long), persistent=False)

    @property
    def first(self) -> int:
        """The first sampled step: 0, or 1 where L_0 is computed for every image."""
        return 0 if self.kind == "uniform" else 1

    def probabilities(self) -> Tensor:
        """p(t) over 0..T-1 (zero below :attr:`first`), float64. Chosen on the device (no
        host read): uniform until every step's history is full (or all zero)."""
        steps = slice(self.first, self.timesteps)
        p = torch.zeros(self.timesteps, dtype=torch.float64, device=self.history.device)
        p[steps] = 1.0 / (self.timesteps - self.first)
        if self.kind == "importance":
            weights = self.history[steps].pow(2).mean(dim=1).sqrt()
            total = weights.sum()
            importance = ((1.0 - self.uniform_mix) * weights / torch.where(total > 0, total, torch.ones_like(total))
                          + self.uniform_mix / (self.timesteps - self.first))
            ready = (self.counts[steps] >= self.history.shape[1]).all() & (total > 0)
            p[steps] = torch.where(ready, importance, p[steps])
        return p

    def sample(self, n: int, device) -> tuple[Tensor, Tensor]:
        """n steps t ~ p and their weights 1 / p(t) (float64)."""
        p = self.probabilities()
        t = torch.multinomial(p, n, replacement=True)
        return t.to(device), (1.0 / p[t]).to(device)

    @torch.no_grad()
    def update(self, t: Tensor, terms: Tensor) -> None:
        """Adds the drawn L_t (nats, one per image) to the history (importance only): each
        step's row is a ring of its last ``history`` values, the next written at
        ``counts % history``. Vectorized on the device, so a training step reads nothing
        back to the host; images that drew the same t enter in batch order, and only the
        last ``history`` of them are kept."""
        if self.kind != "importance":
            return
        width = self.history.shape[1]
        t = t.to(self.counts.device).long()
        values = terms.detach().to(self.history)
        t_sorted, order = torch.sort(t, stable=True)
        values = values[order]
        position = torch.arange(t.numel(), device=t.device)
        starts = torch.ones_like(t_sorted, dtype=torch.bool)
        starts[1:] = t_sorted[1:] != t_sorted[:-1]
        rank = position - torch.cummax(torch.where(starts, position, torch.zeros_like(position)), dim=0).values
        added = torch.zeros_like(self.counts).scatter_add_(0, t_sorted, torch.ones_like(t_sorted))
        kept = rank >= added[t_sorted] - width  # earlier ones would be overwritten in this same call
        slot = (self.counts[t_sorted] + rank) % width
        # A value not kept goes to a scratch row, so no two writes share a slot.
        rows = torch.cat([self.history, self.history.new_zeros(1, width)])
        rows.index_put_((torch.where(kept, t_sorted, torch.full_like(t_sorted, self.timesteps)), slot), values)
        self.history.copy_(rows[:-1])
        self.counts.add_(added)

    def _chronological_index(self, inverse: bool = False) -> Tensor:
        """For each step, the ring's slots oldest first (``inverse``: the way back)."""
        width = self.history.shape[1]
        shift = torch.where(self.counts > width, self.counts % width, torch.zeros_like(self.counts))
        slots = torch.arange(width, device=self.counts.device)
        return (slots + (-shift if inverse else shift).unsqueeze(1)) % width

    def state(self) -> dict:
        """The history oldest value first per step (the layout of earlier checkpoints)."""
        return {"history": self.history.gather(1, self._chronological_index()).cpu(), "counts": self.counts.cpu()}

    def load_state(self, state: dict) -> None:
        if state["history"].shape != self.history.shape:
            raise ValueError(f"the saved time-step history has shape {tuple(state['history'].shape)}, this "
                             f"sampler's is {tuple(self.history.shape)} (another T or history length)")
        self.counts.copy_(state["counts"])
        self.history.copy_(state["history"].to(self.history).gather(1, self._chronological_index(inverse=True)))
