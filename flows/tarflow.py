"""TarFlow (Zhai et al. 2024, "Normalizing Flows are Capable Generative Models"): a
stack of autoregressive flow blocks over image patches, each a causal transformer.

The model cuts the image into T patches of p x p pixels once (patch i is a vector x_i of
C p^2 values, in raster order) and every block works on that sequence (as ml-tarflow
patchifies once per model); the latent is folded back into an image at the end. One
block (:class:`TarFlowBlock`), in raster order or, in every other block, the order
reversed so that each patch is conditioned on the ones after it once:

    (log s_i, b_i) = g(x_<i)      a causal transformer: the output at position j, shifted
                                   one place on, gives patch j + 1's transform
    z_i = (x_i - b_i) exp(-log s_i),   z_0 = x_0
    log|det dz/dx| = -sum_i sum_d log s_i,d       (the Jacobian is block triangular)

The transformer: a linear projection of each patch, a learned positional embedding (and
an optional class embedding), ``layers`` pre-LayerNorm layers of causal self-attention
and a GELU MLP, and a zero-initialized output projection, so a new block is the identity.
The whole model: ``blocks`` such blocks, then a Gaussian prior; its log-likelihood is
exact (``exact = True``).

Sampling inverts the blocks last to first; inside a block patch i + 1 needs patches
<= i, which are known only in turn, so the inverse is sequential. With a key/value cache
(:meth:`TarFlowBlock.inverse`) each of the T - 1 steps runs the transformer on one new
patch and attends to the cached keys and values of the earlier ones: about one forward
pass per block in all, against T full passes without it
(:meth:`TarFlowBlock.inverse_uncached`, kept as the reference the cache is tested
against; ``benchmarks/tarflow_sampling.py`` measures the two).

Read from apple/ml-tarflow where the paper is open (its ``MetaBlock``; nothing copied):

* ``affine`` is its ``nvp`` flag: True gives each patch a scale and a shift; False a
  shift only (volume preserving, log-det 0), for which the prior's variance matters.
  Two ways: by default here the prior's per-channel scale is a learned parameter
  (``learn_prior_scale``, default: on exactly when ``affine`` is off), trained by the
  likelihood's gradient, so the reported likelihood is that of the model that samples;
  ``prior_variance_buffer: true`` is that code's instead: the likelihood (and the loss)
  under a unit prior, and a per-dimension variance buffer moved towards E[z^2] after
  every training step (``lerp`` by 0.1, its ``update_prior``) that scales the prior's
  draws when sampling only. The two are not the same objective: the unit prior weighs
  every latent dimension's error alike, and the figure it reports is not that of the
  sampler (whose latent variance is the buffer's).
* The log-det is summed over all dimensions (an exact log-likelihood); that code's loss
  averages it per dimension, the same objective divided by D.
* Its output projection zeroes the weight only; here the bias too, so that a new model
  is exactly the identity (and its log-likelihood the prior's).
* Class conditioning: a learned embedding per class added to every position, plus one
  for the null class (label -1: classifier-free guidance's unconditional model; that code
  uses the mean of the class embeddings instead). ``label_dropout`` trains the null
  class; ``cond["guidance"] = w`` samples with guidance, each step's log-scale and
  shift moved to (1 + w) conditional - w unconditional (w = 0: plain conditional
  sampling), as that code guides them.

Deep-shallow (STARFlow, Gu et al. 2025; apple/ml-starflow ``transformer_flow.py::Model``,
nothing copied): ``layers_per_block`` a list, e.g. ``[2, 2, 2, 8]``, a few shallow blocks
and, last in the data-to-noise order (first when sampling), one deep block that carries
the capacity. ``condition_deep_block_only`` (that code's ``cond_top_only``) gives the
class embedding to the deep block alone; guidance then applies in the deep block only,
the shallow blocks inverting unguided, as that code's ``reverse`` drops guidance after
its deep block.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flows.base import (GUIDANCE, LABELS, NULL_LABEL, Bijection, check_labels, Condition, GuidanceRule, GuidanceSchedule,
                        at_least_float32, condition_value, guidance_of, with_condition, zero_logdet)
from flows.dequantization import DequantizerFactory
from flows.distributions import GaussianPrior
from flows.model import Encoding, FlowModel



def patchify(x: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, T, C p^2]: non-overlapping p x p patches in raster order."""
    return F.unfold(x, patch_size, stride=patch_size).transpose(1, 2)


def unpatchify(patches: Tensor, patch_size: int, image_size: int) -> Tensor:
    """The inverse of :func:`patchify`."""
    return F.fold(patches.transpose(1, 2), (image_size, image_size), patch_size, stride=patch_size)


class KeyValueCache:
    """The keys and values of one attention layer while sampling: [B, heads, T, d]
    buffers of a fixed shape, written at a position given as a tensor. Every step of the
    sampler therefore has the same shapes and reads nothing back to the host, so
    ``torch.compile`` compiles the step once (a cache grown by concatenation would change
    shape at every step). The newest position attends to the written positions through a
    mask: a step costs attention over all T positions instead of the i written ones, small
    beside the MLPs for one query."""

    def __init__(self, batch: int, heads: int, length: int, head_channels: int, like: Tensor) -> None:
        self.keys = like.new_zeros(batch, heads, length, head_channels)
        self.values = like.new_zeros(batch, heads, length, head_channels)
        self.index = torch.arange(length, device=like.device)

    def write(self, position: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """Store one position's keys and values; the mask [1, 1, 1, T] of positions <= it."""
        self.keys.index_copy_(2, position, keys)
        self.values.index_copy_(2, position, values)
        return (self.index <= position).view(1, 1, 1, -1)


class CausalSelfAttention(nn.Module):
    """Pre-LayerNorm multi-head self-attention in which position i sees positions <= i.
    With a :class:`KeyValueCache` the input is one position (at ``position``, a [1]
    tensor): its keys and values are written to the cache and it attends to every
    position written so far."""

    def __init__(self, channels: int, head_channels: int) -> None:
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"channels ({channels}) must be a multiple of head_channels ({head_channels})")
        self.heads, self.head_channels = channels // head_channels, head_channels
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def new_cache(self, batch: int, length: int, like: Tensor) -> KeyValueCache:
        return KeyValueCache(batch, self.heads, length, self.head_channels, like)

    def forward(self, x: Tensor, cache: KeyValueCache | None = None, position: Tensor | None = None,
                temperature: float = 1.0) -> Tensor:
        """``temperature``: the attention logits divided by it (ml-tarflow's ``attn_temp``,
        the self-guidance of :class:`~flows.base.Guidance`); 1 is plain attention."""
        batch, length, channels = x.shape
        q, k, v = self.qkv(self.norm(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scale = None if temperature == 1.0 else self.head_channels ** -0.5 / temperature
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            visible = cache.write(position, k, v)
            out = F.scaled_dot_product_attention(q, cache.keys, cache.values, attn_mask=visible, scale=scale)
        return self.proj(out.transpose(1, 2).reshape(batch, length, channels))


class TransformerLayer(nn.Module):
    """x + attention(x), then x + MLP(x) (pre-LayerNorm, GELU, ``expansion`` x wide)."""

    def __init__(self, channels: int, head_channels: int, expansion: int) -> None:
        super().__init__()
        self.attention = CausalSelfAttention(channels, head_channels)
        self.mlp = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, expansion * channels), nn.GELU(),
                                 nn.Linear(expansion * channels, channels))

    def forward(self, x: Tensor, cache: KeyValueCache | None = None, position: Tensor | None = None,
                temperature: float = 1.0) -> Tensor:
        x = x + self.attention(x, cache, position, temperature)
        return x + self.mlp(x)


class TarFlowBlock(Bijection):
    """One autoregressive flow block over a sequence of patches, [B, T, D] in raster order
    (the module docstring; :func:`patchify` makes the sequence of an image). ``reverse``:
    condition each patch on the later ones (the patch order reversed inside the block,
    so its input and output are in raster order). Conditions: ``cond["labels"]`` (class
    embedding; -1 the null class) and, when inverting, ``cond["guidance"]``."""

    def __init__(self, patch_dim: int, num_patches: int, channels: int, layers: int, head_channels: int = 64,
                 expansion: int = 4, reverse: bool = False, affine: bool = True, num_classes: int = 0) -> None:
        super().__init__()
        self.patch_dim, self.num_patches = patch_dim, num_patches
        self.reverse, self.affine, self.num_classes = reverse, affine, num_classes
        self.proj_in = nn.Linear(self.patch_dim, channels)
        self.pos_embed = nn.Parameter(torch.randn(self.num_patches, channels) * 1e-2)
        # One row per class and a last one for the null class (label -1).
        self.class_embed = nn.Parameter(torch.randn(num_classes + 1, channels) * 1e-2) if num_classes else None
        self.layers = nn.ModuleList(TransformerLayer(channels, head_channels, expansion) for _ in range(layers))
        self.proj_out = nn.Linear(channels, (2 if affine else 1) * self.patch_dim)
        nn.init.zeros_(self.proj_out.weight)  # a new block is the identity
        nn.init.zeros_(self.proj_out.bias)

    # --- the patch sequence in this block's order -------------------------------------------
    def _in_block_order(self, sequence: Tensor) -> Tensor:
        """Raster order <-> this block's order (its own inverse)."""
        if sequence.dim() != 3 or sequence.shape[1:] != (self.num_patches, self.patch_dim):
            raise ValueError(f"a TarFlow block takes patch sequences [B, {self.num_patches}, {self.patch_dim}], got "
                             f"{list(sequence.shape)}: cut images with flows.tarflow.patchify first")
        return sequence.flip(1) if self.reverse else sequence

    def _embedding(self, cond: Condition, batch: int, like: Tensor, null: bool = False) -> Tensor | None:
        """[B, 1, channels]: the class embedding (the null class where labels are -1, or
        for every sample with ``null``), None without classes."""
        if self.class_embed is None:
            return None
        labels = condition_value(cond, LABELS)
        if labels is None:
            raise ValueError(f"this TarFlow is class-conditional: pass cond['{LABELS}'] (-1 for no class)")
        labels = check_labels(labels.long().to(like.device), self.num_classes)
        if null:
            labels = torch.full_like(labels, NULL_LABEL)
        rows = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
        return self.class_embed[rows].unsqueeze(1).to(like.dtype)

    def _transform(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """(log-scale, shift) from the output projection, the log-scale in float32 or wider."""
        if self.affine:
            log_scale, shift = out.chunk(2, dim=-1)
            return at_least_float32(log_scale), shift
        return at_least_float32(torch.zeros_like(out)), out

    def _patch_transforms(self, sequence: Tensor, cond: Condition, null: bool = False,
                          attention_temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """Every patch's (log-scale, shift) from the patches before it: one causal pass,
        the outputs shifted one position on (the first patch gets the identity).
        ``null``, ``attention_temperature``: the unconditional pass of guidance."""
        h = self.proj_in(sequence) + self.pos_embed.to(sequence.dtype)
        embedding = self._embedding(cond, sequence.shape[0], sequence, null=null)
        if embedding is not None:
            h = h + embedding
        for layer in self.layers:
            h = layer(h, temperature=attention_temperature)
        out = self.proj_out(h)
        out = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
        return self._transform(out)

    # --- the two directions ------------------------------------------------------------------
    def forward(self, x: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        sequence = self._in_block_order(x)
        log_scale, shift = self._patch_transforms(sequence, cond)
        z = ((sequence - shift) * torch.exp(-log_scale)).to(x.dtype)
        return self._in_block_order(z), -log_scale.flatten(1).sum(dim=1)

    def inverse(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        """Patch by patch with a key/value cache: step i runs the transformer on patch i
        alone (attending to the cached earlier ones) and inverts patch i + 1. With
        ``cond["guidance"]`` (:class:`~flows.base.Guidance`, weight w > 0) a second,
        unconditional pass (the null class, and/or attention at the guidance's
        temperature) guides each step's Gaussian by the guidance's rule, at the weight
        its schedule gives step i of T - 1. Every step has the same shapes
        (:class:`KeyValueCache`), so a compiled step (:meth:`TarFlow.compile_sampler`)
        compiles once."""
        guidance = guidance_of(cond)
        temperature = guidance.attention_temperature
        is_guided = guidance.weight > 0 and (self.class_embed is not None or temperature != 1.0)
        sequence = self._in_block_order(z)
        patches = [sequence[:, 0].contiguous()]  # the strides of every later patch: one compiled step
        caches = self._new_caches(z)
        null_caches = self._new_caches(z) if is_guided else None
        embedding = self._embedding(cond, z.shape[0], z)
        null_embedding = self._embedding(cond, z.shape[0], z, null=True) if is_guided else None
        positions = torch.arange(self.num_patches, device=z.device)
        steps = self.num_patches - 1
        log_scales = []
        for i in range(steps):
            position = positions[i:i + 1]
            log_scale, shift = self.step(patches[-1], position, embedding, caches)
            if is_guided:
                null_log_scale, null_shift = self.step(patches[-1], position, null_embedding, null_caches, temperature)
                shift, log_scale = guidance.combine(shift, log_scale, null_shift, null_log_scale,
                                                    guidance.weight_at(i, steps))
            patches.append((sequence[:, i + 1] * torch.exp(log_scale) + shift).to(z.dtype))
            log_scales.append(log_scale)
        logdet = torch.stack(log_scales, 1).sum(dim=(1, 2)) if log_scales else z.new_zeros(z.shape[0])
        return self._in_block_order(torch.stack(patches, dim=1)), at_least_float32(logdet)

    def _new_caches(self, like: Tensor) -> list[KeyValueCache]:
        """One empty cache per layer for the T - 1 positions a sampling pass writes."""
        length = max(self.num_patches - 1, 1)
        dtype_like = like.new_empty(0, dtype=self.proj_in.weight.dtype)
        return [layer.attention.new_cache(like.shape[0], length, dtype_like) for layer in self.layers]

    def step(self, patch: Tensor, position: Tensor, embedding: Tensor | None,
             caches: list[KeyValueCache], attention_temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """Patch i + 1's (log-scale, shift) from patch i (``position`` = [i]) and the
        caches of patches < i. :meth:`TarFlow.compile_sampler` replaces it on the
        instance by its compiled form."""
        h = self.proj_in(patch.unsqueeze(1)) + self.pos_embed.index_select(0, position).to(patch.dtype)
        if embedding is not None:
            h = h + embedding
        for layer, cache in zip(self.layers, caches):
            h = layer(h, cache, position, attention_temperature)
        log_scale, shift = self._transform(self.proj_out(h))
        return log_scale[:, 0], shift[:, 0]

    def inverse_uncached(self, z: Tensor, cond: Condition = None) -> tuple[Tensor, Tensor]:
        """The same inverse without a cache (T - 1 full causal passes, no guidance): the
        reference :meth:`inverse` is tested against and benchmarked with."""
        sequence = self._in_block_order(z)
        x = sequence.clone()
        log_scale = None
        for i in range(1, self.num_patches):
            log_scale, shift = self._patch_transforms(x, cond)
            x = torch.cat([x[:, :i], (sequence[:, i:i + 1] * torch.exp(log_scale[:, i:i + 1])
                                      + shift[:, i:i + 1]).to(z.dtype), x[:, i + 1:]], dim=1)
        logdet = log_scale.flatten(1).sum(dim=1) if log_scale is not None else z.new_zeros(z.shape[0])
        return self._in_block_order(x), at_least_float32(logdet)

    def extra_repr(self) -> str:
        return (f"patches={self.num_patches} x {self.patch_dim}, reverse={self.reverse}, affine={self.affine}, "
                f"num_classes={self.num_classes}")


class TarFlow(FlowModel):
    """TarFlow as a whole model (the module docstring; paper Table 2 and apple/ml-tarflow).

    Args:
        in_channels, image_size: the images modelled.
        patch_size: p (the paper: 2 on ImageNet 64 density, 8 on AFHQ 256).
        channels: the transformer's width (768 for ImageNet 64).
        blocks, layers_per_block: flow blocks and transformer layers in each (8 x 8); a
            list gives each block its own (data-to-noise order; STARFlow's deep-shallow
            ``[2, 2, 2, 8]``: the last, deep block first when sampling).
        condition_deep_block_only: with ``num_classes``, only the last (deep) block sees
            the class, and guidance applies in it alone (STARFlow's ``cond_top_only``).
        head_channels: channels per attention head (64); expansion: the MLP's width factor (4).
        affine: per-patch scale and shift (ml-tarflow's ``nvp``); False: shift only.
        num_classes: > 0 adds a class embedding to every block (labels in cond["labels"],
            -1 the null class).
        label_dropout: in training, the fraction of labels replaced by the null class
            (classifier-free guidance; the paper trains with 0.1).
        guidance: the guidance weight w of samples whose cond names none (0: conditional
            sampling).
        guidance_rule, guidance_schedule, guidance_attention_temperature: how guidance
            combines the two passes (:class:`~flows.base.Guidance`): ``cfg`` (TarFlow sec.
            2.4) or ``starflow`` (Gu et al. 2025); ``constant`` or ``annealed`` along the
            patches ((i + 1) / (T - 1) w at step i: ml-tarflow's FID script samples so);
            the unconditional pass's attention temperature (ml-tarflow's ``attn_temp``:
            an unconditional TarFlow is guided by its own sharpened attention, < 1).
        learn_prior_scale: learn the Gaussian prior's per-channel mean and scale (None:
            exactly when ``affine`` is off and there is no variance buffer).
        prior_variance_buffer: ml-tarflow's shift-only prior: a unit prior in the
            likelihood, a per-dimension variance buffer (E[z^2], lerp 0.1 per training
            step) scaling the draws when sampling (the module docstring).
        input_scale: the images enter the blocks multiplied by this (a fixed linear
            bijection, its log-det D log s in the likelihood, so the figure stays that of
            the images in model space): 1 keeps the project's [-0.5, 0.5], 2 gives
            ml-tarflow's [-1, 1] (whose blocks see twice the spread).
        dequantizer: as Glow's (``flows/dequantization.py``).
    """

    guides_by_attention = True  # guidance_attention_temperature != 1 guides without classes

    def __init__(self, *, in_channels: int = 3, image_size: int = 32, patch_size: int = 2, channels: int = 256,
                 blocks: int = 4, layers_per_block: int | list[int] = 4, head_channels: int = 64,
                 expansion: int = 4, affine: bool = True, num_classes: int = 0,
                 condition_deep_block_only: bool = False, label_dropout: float = 0.0, guidance: float = 0.0,
                 guidance_rule: GuidanceRule = "cfg", guidance_schedule: GuidanceSchedule = "constant",
                 guidance_attention_temperature: float = 1.0, learn_prior_scale: bool | None = None,
                 prior_variance_buffer: bool = False, input_scale: float = 1.0,
                 dequantizer: DequantizerFactory | None = None) -> None:
        super().__init__(dequantizer, in_channels)
        layers = [layers_per_block] * blocks if isinstance(layers_per_block, int) else list(layers_per_block)
        if len(layers) == 1:  # as ml-starflow: one entry serves every block
            layers = layers * blocks
        if len(layers) != blocks:
            raise ValueError(f"TarFlow's layers_per_block lists {len(layers)} blocks but blocks is {blocks}: give "
                             f"one layer count per block (e.g. {[2] * (blocks - 1) + [8]}) or a single number")
        for name, value in dict(in_channels=in_channels, image_size=image_size, patch_size=patch_size,
                                channels=channels, blocks=blocks, head_channels=head_channels,
                                expansion=expansion).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TarFlow's {name} must be a positive integer, got {value!r}")
        if not all(isinstance(value, int) and value >= 1 for value in layers):
            raise ValueError(f"TarFlow's layers_per_block must be positive integers, got {layers_per_block!r}")
        if num_classes < 0:
            raise ValueError(f"TarFlow's num_classes must be >= 0 (0: unconditional), got {num_classes}")
        if condition_deep_block_only and not num_classes:
            raise ValueError("TarFlow's condition_deep_block_only conditions the deep block on the class: it needs "
                             "num_classes > 0")
        if image_size % patch_size:
            raise ValueError(f"TarFlow's image_size {image_size} is not a multiple of patch_size {patch_size}; "
                             f"choose a patch_size that divides it (e.g. {max(p for p in (1, 2, 4, 8) if image_size % p == 0)})")
        if channels % head_channels:
            raise ValueError(f"TarFlow's channels ({channels}) must be a multiple of head_channels ({head_channels})")
        self.in_channels, self.image_size, self.patch_size, self.num_classes = (in_channels, image_size, patch_size,
                                                                               num_classes)
        self.layers_per_block, self.condition_deep_block_only = layers, condition_deep_block_only
        self.set_guidance(label_dropout, guidance, guidance_rule, guidance_schedule, guidance_attention_temperature)
        deep = blocks - 1
        self.blocks = nn.ModuleList(
            TarFlowBlock(in_channels * patch_size ** 2, (image_size // patch_size) ** 2, channels, layers[index],
                         head_channels, expansion, reverse=index % 2 == 1, affine=affine,
                         num_classes=0 if condition_deep_block_only and index != deep else num_classes)
            for index in range(blocks))
        if prior_variance_buffer and learn_prior_scale:
            raise ValueError("TarFlow: prior_variance_buffer keeps a unit prior in the likelihood; it cannot also "
                             "learn_prior_scale (choose one way to fit the latents' variance)")
        learned = (not affine and not prior_variance_buffer) if learn_prior_scale is None else learn_prior_scale
        self.prior = GaussianPrior((in_channels, image_size, image_size), learned=learned)
        self.prior_variance_buffer = bool(prior_variance_buffer)
        if not input_scale > 0:
            raise ValueError(f"TarFlow's input_scale must be > 0 (2 for ml-tarflow's [-1, 1]), got {input_scale}")
        self.input_scale = float(input_scale)
        if self.prior_variance_buffer:  # ml-tarflow's ``var``: per latent dimension
            self.register_buffer("latent_variance", torch.ones(in_channels, image_size, image_size))
        self.check_dequantizer()

    def _check_input(self, x: Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"TarFlow expects images of shape [B, {', '.join(map(str, expected))}], "
                             f"got {list(x.shape)}")

    def to_patches(self, image: Tensor) -> Tensor:
        """[B, C, H, W] -> the blocks' [B, T, C p^2] sequence (once per pass, not per block)."""
        return patchify(image, self.patch_size)

    def to_image(self, sequence: Tensor) -> Tensor:
        return unpatchify(sequence, self.patch_size, self.image_size)

    def encode(self, x: Tensor, cond: Condition = None) -> Encoding:
        self._check_input(x)
        z = self.to_patches(x * self.input_scale if self.input_scale != 1.0 else x)
        logdet = zero_logdet(x) + self.dims * math.log(self.input_scale)
        for block in self.blocks:
            z, block_logdet = block(z, cond)
            logdet = logdet + block_logdet
        z = self.to_image(z)
        return Encoding([z], logdet, self.prior.log_prob(z), exact=self.exact)

    VARIANCE_RATE = 0.1  # ml-tarflow's VAR_LR

    def encode_for_training(self, x: Tensor, cond: Condition = None):
        """:meth:`encode`; with ``prior_variance_buffer``, a training pass also moves the
        buffer towards the batch's E[z^2] per dimension (ml-tarflow's ``update_prior``;
        under DDP the buffers are broadcast from process 0 each step, so its batch sets
        it, where that code averages over every process's)."""
        encoding, prior = super().encode_for_training(x, cond)
        if self.prior_variance_buffer and self.training:
            with torch.no_grad():
                z = encoding.latents[0].detach().float()
                self.latent_variance.lerp_(z.pow(2).mean(dim=0), self.VARIANCE_RATE)
        return encoding, prior

    def _draw(self, n: int, temperature: float) -> Tensor:
        """n draws of the prior at ``temperature`` (times the variance buffer's std)."""
        z = self.prior.sample(n, None, temperature)
        if self.prior_variance_buffer:
            z = z * self.latent_variance.sqrt()
        return z.to(self.blocks[0].proj_in.weight.dtype)

    def decode(self, latents: list[Tensor | None], cond: Condition = None, temperature: float = 1.0,
               cached: bool = True) -> Tensor:
        """Inverse of :meth:`encode`; a latent given as None is drawn at ``temperature``
        (the batch size from the labels). ``cached``: False inverts without the key/value
        cache (the reference, for tests and benchmarks). The model's own ``guidance``
        applies only to a drawn latent (guidance changes the inverse itself: a given
        latent decodes to what it encodes unless ``cond["guidance"]`` says otherwise)."""
        z = latents[0]
        if z is None:
            cond = self.guided_condition(cond)
            labels = condition_value(cond, LABELS)
            if labels is None:
                raise ValueError("pass a latent or labels to fix the batch size")
            z = self._draw(labels.shape[0], temperature)
        z = self.to_patches(z)
        for index, block in reversed(list(enumerate(self.blocks))):
            if self.condition_deep_block_only and index == len(self.blocks) - 2:
                cond = with_condition(cond, **{GUIDANCE: 0.0})  # the shallow blocks invert unguided
            z = (block.inverse if cached else block.inverse_uncached)(z, cond)[0]
        x = self.to_image(z)
        return x / self.input_scale if self.input_scale != 1.0 else x

    @torch.no_grad()
    def sample(self, n: int, cond: Condition = None, temperature: float = 1.0) -> Tensor:
        """n samples; a class-conditional TarFlow without labels draws them uniformly.
        ``cond["guidance"]``: the classifier-free guidance weight (0: none)."""
        if self.num_classes and condition_value(cond, LABELS) is None:
            cond = with_condition(cond, **{LABELS: torch.randint(0, self.num_classes, (n,), device=self._device())})
        z = self._draw(n, temperature)
        return self.finish_samples(self.decode([z], self.guided_condition(cond)), cond)

    def compile_sampler(self, **options) -> None:
        """Compile the sampler's step (one transformer pass over one patch), shared by every
        block: with the static-shape cache it compiles once per direction of the patch
        order and guidance on or off, whatever the patch. ``options``: torch.compile's
        (``mode``, ``backend``). The parameters keep their names: the compiled function is
        an attribute of each block, not a wrapper module."""
        compiled = torch.compile(TarFlowBlock.step, **options)
        for block in self.blocks:
            block.step = functools.partial(compiled, block)

    @property
    def display_name(self) -> str:
        shape = "" if len(set(self.layers_per_block)) == 1 else "-deep" + str(self.layers_per_block[-1])
        return f"TarFlow{'CC' if self.num_classes else ''}{self.image_size}{shape}"

    def extra_repr(self) -> str:
        if not (self.num_classes or self.guidance):
            return ""
        return f"label_dropout={self.label_dropout}, guidance={self.default_guidance}"
