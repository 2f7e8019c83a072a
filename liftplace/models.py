"""Teachers and students: builders, pruning, sizing, parameter and MAC counts, feature taps.

Teachers are diffusers ``UNet2DModel`` (the paper's DDPM backbone) or, for the transformer
ablation, a class-conditional ``DiTTransformer2DModel``. Students are made from a teacher in
one of two ways:

- ``prune_student``: structured channel pruning with torch-pruning, keeping the teacher's
  surviving weights (as Diff-Pruning does) -- the paper's students; with ``groups="teacher"``
  and ``importance="taylor"`` built as the authors' are (below);
- ``fresh_student``: a freshly initialised, narrower model of the same family, sized to a
  parameter ratio -- the from-scratch baseline, and the only route for DiT teachers.

Pruned students (``prune_student`` with magnitude importance) of the ``UNET_SIZES`` teachers
at 16x16, as a fraction of the teacher's parameters, measured with ``count_params``; MACs
from ``count_macs`` for one 1x16x16 image. The fractions depend on widths only, not weights.

    ====  ==========  ===========  ========  ========  ==========  ========
    size  parameters  MACs         ratio .5  ratio .7  ratio .875  ratio .9
    ====  ==========  ===========  ========  ========  ==========  ========
    tiny      44,969    4,551,168    0.2598    0.0711      0.0199    0.0090
    xs       280,177   15,532,032    0.2544    0.0814      0.0176    0.0097
    s        627,433   34,842,624    0.2533    0.0878      0.0171    0.0081
    m      1,112,801   61,849,600    0.2527    0.0894      0.0168    0.0097
    l      2,497,873  138,952,704    0.2521    0.0870      0.0165    0.0094
    ====  ==========  ===========  ========  ========  ==========  ========

A layer keeps int(width * (1 - ratio)) channels (at least one), and each weight shrinks on
both sides, so the fraction is about (1 - ratio)^2. The paper's students keep ~1.6% of the
teacher: here that is a ratio of 0.875, not 0.9 (which keeps ~1%).

That is ``groups="gcd"`` (the default): while torch-pruning runs every GroupNorm has one group,
so any channel can go, and the groups come back as gcd(channels, teacher's groups)
(``student_groups``). The authors' students (Diff-Pruning, Fang et al.) keep the teacher's
GroupNorm group count and remove the same positions inside every group, ranked by first-order
Taylor importance |w * dL/dw| with the gradients of the diffusion loss on a few training batches
(``importance="taylor"``, ``Calibration``), and train with dropout 0.1 in the ResNet blocks
(``set_dropout``). With ``groups="teacher"`` a layer whose channels reach GroupNorms of g groups
keeps int(width / g * (1 - ratio)) channels per group; where that is none torch-pruning would
prune nothing there and leave the layer whole (unet-m at 0.9 keeps 889,501 parameters, 80%,
every norm at its teacher width), so such layers keep one channel per group instead
(``_narrow_group_ratios``). Layers that reach no GroupNorm (the time embedding, attention's
q/k/v, a last up-block's output into its upsampler) are pruned as with "gcd". The students, by
``prune_student(..., groups="teacher")`` (magnitude; Taylor keeps other channels, the same
counts), as a fraction of the teacher's parameters (MACs of the 0.9 student, as above):

    ====  ==========  ========  ========  ========  ========  =============  ==========
    size  parameters  ratio .5  ratio .7  ratio .8  ratio .9  params at .9   MACs at .9
    ====  ==========  ========  ========  ========  ========  =============  ==========
    tiny      44,969    0.2598    0.0999    0.0944    0.0876      3,940        528,513
    xs       280,177    0.2544    0.0861    0.0795    0.0736     20,611      1,835,156
    s        627,433    0.2379    0.0434    0.0387    0.0340     21,348      1,863,745
    m      1,112,801    0.2527    0.0675    0.0237    0.0202     22,453      1,920,560
    l      2,497,873    0.2521    0.0629    0.0303    0.0099     24,734      2,006,401
    ====  ==========  ========  ========  ========  ========  =============  ==========

With one channel per group as the floor, every size's 90% student is about the same ~21-25k
parameters (8 channels in 8 groups nearly everywhere), so the fraction falls with the teacher's
width rather than sitting at (1 - ratio)^2; unet-m's 0.8 and 0.9 students differ only in the
layers that reach no GroupNorm. ("gcd" at 0.8, for comparison: 0.0379 / 0.0366 / 0.0370 / 0.0401
of xs / s / m / l.)

unet-m (widths 32, 64, 64; 8 groups) at 0.9, channels / GroupNorm groups per layer:

    =======================================  =================  =================
    layer                                    groups="gcd"       groups="teacher"
    =======================================  =================  =================
    conv_in                                  3                  8
    down 0 resnet: norm1, conv1/norm2, out   3/1, 3/1, 3        8/8, 8/8, 8
    down 1 resnet: norm1, conv1/norm2, out   3/1, 6/2, 6        8/8, 8/8, 8
    down 2, mid: norms (resnets, attention)  6/2                8/8
    attention q/k/v (heads)                  6 (1 head of 6)    6 (1 head of 6)
    up 0-1 resnets: norm1 (concat), norm2    12/4, 6/2          16/8, 8/8
    up 1 resnet 1: norm1, out (to upsampler) 9/1, 6             16/8, 6
    up 2 resnets: norm1 (concat), norm2      9/1 and 6/2, 3/1   16/8, 8/8
    conv_norm_out, conv_out in               3/1, 3             8/8, 8
    time embedding (32 -> 128 -> 128)        12, 12             12, 12
    parameters (fraction of the teacher)     10,801 (0.97%)     22,453 (2.02%)
    =======================================  =================  =================

"gcd" leaves 3 channels per group everywhere but the 9-channel norms (one group); "teacher"
leaves one channel per group (two over the up blocks' concatenations). Measured at the `cpu`
preset (studies/regime.py, 2,000 steps, task and kd, 2 seeds): unet-m's "teacher" students at 0.8
and 0.9 learned nothing (FID ~1,720-1,800, as today's student forced to 3 channels in 3 groups
did); of unet-l's only the 0.8 student learned (FID 154 task / 128 kd, one seed, still falling).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from diffusers import DiTTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Widths per resolution level, for 1-channel images at 16x16 or 32x32 (16 -> 8 -> 4 at 16x16).
# Every size has the same layout -- plain ResNet levels, then self-attention at the lowest
# resolution level and in the mid block, where it is cheap (16 tokens at 16x16) -- so the
# teacher-scale study varies width alone. "xs" to "l" span ~9x in parameters (0.28M to 2.5M);
# "tiny" (45k parameters, two levels) is for tests.
UNET_SIZES: dict[str, dict] = {
    "tiny": {"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4},
    "xs": {"block_out_channels": (16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8},
    "s": {"block_out_channels": (24, 48, 48), "layers_per_block": 1, "norm_num_groups": 8},
    "m": {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "norm_num_groups": 8},
    "l": {"block_out_channels": (48, 96, 96), "layers_per_block": 1, "norm_num_groups": 8},
}
UNET_ATTENTION_HEAD_DIM = 8

# Patch 2 on 16x16 gives 64 tokens; "s" has a hidden size of 64 (~0.39M parameters).
DIT_SIZES: dict[str, dict] = {
    "tiny": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2},
    "s": {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 16, "patch_size": 2},
}

# Text-to-image U-Nets (UNet2DConditionModel) laid out as Stable Diffusion's: cross-attention in
# every stage but the innermost, two ResNet blocks per stage (so that BK-SDM's removals apply),
# the innermost stage as wide as the one before it (so that bk-tiny keeps its weights).
# ``attention_head_dim`` is diffusers' name for the number of heads here.
SD_SIZES: dict[str, dict] = {
    "tiny": {"block_out_channels": (8, 16, 16), "layers_per_block": 2, "norm_num_groups": 4, "attention_head_dim": 2},
    "s": {"block_out_channels": (32, 64, 64), "layers_per_block": 2, "norm_num_groups": 8, "attention_head_dim": 4},
}

# SD3 (MMDiT) transformers for tests: joint blocks over 2x2 patches, with the widths of two small
# CLIP encoders (``pooled_projection_dim`` their projections together, ``joint_attention_dim`` at
# least their widths together: ``recipes.save_text_pipeline`` builds them).
SD3_SIZES: dict[str, dict] = {
    "tiny": {"num_layers": 3, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2,
             "joint_attention_dim": 64, "pooled_projection_dim": 40, "caption_projection_dim": 16},
}

IMPORTANCES: dict[str, Callable[[], tp.importance.Importance]] = {
    "magnitude": lambda: tp.importance.MagnitudeImportance(p=2),
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "random": tp.importance.RandomImportance,
    # first-order Taylor, sum of |w * dL/dw| over a channel's weights (Diff-Pruning's criterion),
    # with dL/dw accumulated from the diffusion loss on calibration batches (``Calibration``)
    "taylor": tp.importance.TaylorImportance,
}
NEEDS_DATA = {"taylor"}  # importances that need a Calibration

# How a pruned UNet's GroupNorms are grouped (``prune_student``): "gcd" prunes every channel
# freely (each norm has one group while torch-pruning runs) and regroups after (``student_groups``);
# "teacher" keeps every norm's teacher group count and removes the same positions inside each
# group (torch-pruning's channel-group handling), as Diff-Pruning's students are built.
GROUPINGS = ("gcd", "teacher")

# Taylor importance's calibration: batches of TAYLOR_BATCH training images (fewer if the split is
# smaller) picked, noised and timed by one generator seeded CALIBRATION_SEED, whatever the run's seed.
TAYLOR_BATCH = 64
CALIBRATION_SEED = 0


@dataclass(frozen=True)
class Calibration:
    """What Taylor importance computes its gradients from: the training split the denoiser learns
    from (``images``: x0 [N, C, H, W], pixels or a latent teacher's latents), its class labels
    ([N], or None for an unconditional data set) and the teacher's noise process (a
    ``diffusion.NoiseProcess``). Pruning picks its batches, timesteps and noise itself, from a
    generator seeded ``CALIBRATION_SEED``: the same split gives the same student."""

    images: torch.Tensor
    process: object
    labels: torch.Tensor | None = None
    captions: object = None  # a text-to-image split's text.Captions: the conditions, in place of labels

    @classmethod
    def of(cls, split, process) -> Calibration:
        """A run's calibration: its training split as the denoisers see it (a ``latents.Split``:
        x0, its labels where the data set has classes, its captions' embeddings for a
        text-to-image teacher) and its noise process."""
        if split.captions is not None:
            return cls(split.x0, process, split.labels, split.captions)
        return cls(split.x0, process, split.labels if split.num_classes else None)

    def condition(self, idx: torch.Tensor) -> torch.Tensor:
        """What the denoiser is conditioned on for images ``idx``: class labels, or caption embeddings."""
        return self.captions.embeddings(idx) if self.captions is not None else self.labels[idx]


def _choice(kind: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {sorted(choices)}")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or DataParallel) wrapper, else the model."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def in_channels(model: nn.Module) -> int:
    """The image channels a diffusers model takes (its config's in_channels)."""
    return int(_unwrap(model).config.in_channels)


def _first_param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


def build_unet(size: str, *, in_channels: int = 1, resolution: int = 16) -> UNet2DModel:
    """A freshly initialised teacher UNet of a named size (see ``UNET_SIZES``).

    It maps x_t [B, in_channels, resolution, resolution] and t [B] to a prediction of the
    same shape as x_t. ``resolution`` must be divisible by 2 ** (levels - 1).
    """
    _choice("UNet size", size, UNET_SIZES)
    _positive_int("in_channels", in_channels)
    spec = UNET_SIZES[size]
    levels = len(spec["block_out_channels"])
    factor = 2 ** (levels - 1)
    if not isinstance(resolution, int) or resolution < factor or resolution % factor:
        raise ValueError(
            f"resolution must be a positive multiple of {factor} for UNet size {size!r}, got {resolution!r}"
        )
    return UNet2DModel(
        sample_size=resolution,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        attention_head_dim=UNET_ATTENTION_HEAD_DIM,
        **spec,
    )


def build_dit(
    size: str = "s",
    *,
    in_channels: int = 1,
    resolution: int = 16,
    num_classes: int = 10,
    learn_sigma: bool = False,
) -> DiTTransformer2DModel:
    """A freshly initialised class-conditional DiT of a named size (see ``DIT_SIZES``).

    It maps x_t [B, in_channels, resolution, resolution], t [B] and class labels [B] (in
    0..num_classes - 1) to [B, out_channels, resolution, resolution], where out_channels is
    in_channels, or 2 * in_channels with ``learn_sigma`` (DiT's learned variance channels,
    which ``predict`` splits off). In train mode diffusers drops 10% of the labels to a null
    class (index num_classes) for classifier-free guidance.
    """
    _choice("DiT size", size, DIT_SIZES)
    _positive_int("in_channels", in_channels)
    _positive_int("num_classes", num_classes)
    spec = DIT_SIZES[size]
    patch = spec["patch_size"]
    if not isinstance(resolution, int) or resolution < patch or resolution % patch:
        raise ValueError(
            f"resolution must be a positive multiple of the patch size {patch} for DiT size {size!r}, "
            f"got {resolution!r}"
        )
    return DiTTransformer2DModel(
        in_channels=in_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels,
        sample_size=resolution,
        num_embeds_ada_norm=num_classes,
        **spec,
    )


def build_sd_unet(size: str = "s", *, in_channels: int = 4, resolution: int = 8,
                  cross_attention_dim: int = 32) -> UNet2DConditionModel:
    """A freshly initialised text-to-image U-Net of a named size (``SD_SIZES``) for latents
    [B, in_channels, resolution, resolution] and caption embeddings [B, L, cross_attention_dim]."""
    _choice("text-to-image U-Net size", size, SD_SIZES)
    spec = SD_SIZES[size]
    levels = len(spec["block_out_channels"])
    if not isinstance(resolution, int) or resolution < 2 ** (levels - 1) or resolution % 2 ** (levels - 1):
        raise ValueError(f"resolution must be a positive multiple of {2 ** (levels - 1)}, got {resolution!r}")
    return UNet2DConditionModel(
        sample_size=resolution, in_channels=in_channels, out_channels=in_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=cross_attention_dim, **spec)


def build_sd3(size: str = "tiny", *, in_channels: int = 4, resolution: int = 8) -> SD3Transformer2DModel:
    """A freshly initialised SD3 transformer of a named size (``SD3_SIZES``) for latents
    [B, in_channels, resolution, resolution]."""
    _choice("SD3 transformer size", size, SD3_SIZES)
    return SD3Transformer2DModel(sample_size=resolution, in_channels=in_channels, out_channels=in_channels,
                                 pos_embed_max_size=max(16, resolution), **SD3_SIZES[size])


def predict(
    model: nn.Module, x_t: torch.Tensor, t: torch.Tensor | int | float, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """The model's prediction for x_t [B, C, H, W] at timesteps t (a number or [B]): [B, C, H, W].

    One interface for every backbone. The call goes through ``model`` itself, so a
    DistributedDataParallel wrapper still synchronises gradients. A DiT gets ``labels``
    (class 0 for every sample when None) and its learned-sigma channels are dropped; a UNet
    uses labels only if it has class embeddings (again class 0 when None). A text-conditioned
    UNet2DConditionModel takes caption embeddings [B, L, D] as ``labels`` (its
    ``encoder_hidden_states``; one token of zeros when None, for probes of sizes and MACs); an
    SD3Transformer2DModel takes them packed with its pooled projections (``pack_sd3``).
    """
    if x_t.ndim != 4:
        raise ValueError(f"x_t must be [B, C, H, W], got shape {tuple(x_t.shape)}")
    net = _unwrap(model)
    batch = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device)
    if t.ndim == 0:
        t = t.expand(batch)
    needs_labels = isinstance(net, DiTTransformer2DModel) or getattr(net, "class_embedding", None) is not None
    if needs_labels and labels is None:
        labels = torch.zeros(batch, dtype=torch.long, device=x_t.device)
    if isinstance(net, DiTTransformer2DModel):
        out = model(x_t, timestep=t, class_labels=labels).sample
        # DiT's learned variance rides along as extra channels; the prediction is the first half.
        return out[:, : x_t.shape[1]] if net.out_channels == 2 * x_t.shape[1] else out
    if isinstance(net, UNet2DModel):
        return model(x_t, t, class_labels=labels if needs_labels else None).sample
    if isinstance(net, SD3Transformer2DModel):
        if labels is None:  # a probe's stand-in: one token of zeros, and zero pooled projections
            labels = torch.zeros(batch, 2, net.config.joint_attention_dim, device=x_t.device, dtype=x_t.dtype)
        context, pooled = unpack_sd3(net, labels)
        return model(hidden_states=x_t, timestep=t, encoder_hidden_states=context, pooled_projections=pooled).sample
    if isinstance(net, UNet2DConditionModel):
        if labels is None:  # a probe's stand-in (sizes, MACs): one token of zeros
            labels = torch.zeros(batch, 1, net.config.cross_attention_dim, device=x_t.device, dtype=x_t.dtype)
        return model(x_t, t, encoder_hidden_states=labels).sample
    raise ValueError(f"model must be a UNet2DModel, UNet2DConditionModel or DiTTransformer2DModel, got {type(net).__name__}")


def pack_sd3(context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """An SD3 caption's two conditions as one tensor, so that they travel as one (cached, drawn,
    dropped and guided like a U-Net's context): the token embeddings [B, L, D] and, as one more
    token, the pooled projections [B, P] zero-padded to D (P <= D: SD3's 2,048 and 4,096)."""
    if pooled.shape[-1] > context.shape[-1]:
        raise ValueError(f"pooled projections of {pooled.shape[-1]} do not fit tokens of {context.shape[-1]}")
    padded = nn.functional.pad(pooled, (0, context.shape[-1] - pooled.shape[-1]))
    return torch.cat([context, padded[:, None].to(context.dtype)], dim=1)


def unpack_sd3(net: SD3Transformer2DModel, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token embeddings, pooled projections) of ``pack_sd3``'s tensor, for ``net``."""
    return packed[:, :-1], packed[:, -1, : net.config.pooled_projection_dim]


def count_params(model: nn.Module) -> int:
    """The number of parameters (trainable or not)."""
    return sum(p.numel() for p in _unwrap(model).parameters())


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of scaled dot-product attention from q, k, v shapes [B, heads, L, D].

    FlopCounterMode counts the CUDA attention kernels but not the CPU one, which would
    leave attention out of every MAC count taken on a CPU.
    """
    batch, heads, queries, dim = query
    return 2 * batch * heads * queries * key[-2] * (dim + value[-1])


def count_macs(model: nn.Module, example_shape: Sequence[int], labels: torch.Tensor | None = None) -> int:
    """Multiply-accumulates of one forward of a batch-1 input of shape [1, *example_shape[1:]].

    Counted by torch's FlopCounterMode (matmuls, convolutions, attention; not norms or
    activations), MACs = FLOPs / 2. ``example_shape`` is [B, C, H, W]; B is ignored.
    """
    if len(example_shape) != 4:
        raise ValueError(f"example_shape must be [B, C, H, W], got {tuple(example_shape)}")
    param = _first_param(_unwrap(model))
    x = torch.zeros((1, *example_shape[1:]), device=param.device, dtype=param.dtype)
    t = torch.zeros(1, dtype=torch.long, device=param.device)
    return _macs(lambda: predict(_unwrap(model), x, t, None if labels is None else labels[:1].to(param.device)))


def _macs(call: Callable[[], object]) -> int:
    """MACs of ``call()`` (FLOPs / 2 by torch's FlopCounterMode, CPU attention included)."""
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        call()
    return counter.get_total_flops() // 2


def count_decode_macs(vae: nn.Module, latent_shape: Sequence[int]) -> int:
    """Multiply-accumulates of a VAE's decoding of one latent [1, *latent_shape[1:]] (counted
    as ``count_macs`` counts): what each latent sample costs beyond its denoiser's steps."""
    param = _first_param(vae)
    z = torch.zeros((1, *latent_shape[1:]), device=param.device, dtype=param.dtype)
    return _macs(lambda: vae.decode(z))


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def meta_peak(call: Callable[[], object], *modules: nn.Module) -> int:
    """Peak bytes torch's MemTracker sees while ``call()`` runs on "meta" ``modules`` (their
    weights included): an estimate that computes nothing. The modules' parameters must require
    gradients (MemTracker hooks each one's gradient)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*modules)
    with tracker:
        call()
    peak = tracker.get_tracker_snapshot("peak")
    return int(sum(snap["Total"] for device, snap in peak.items() if device.type == "meta"))


def prune_student(
    teacher: nn.Module,
    ratio: float,
    *,
    example_shape: Sequence[int] = (2, 1, 16, 16),
    importance: str = "magnitude",
    min_group_channels: int = 1,
    groups: str = "gcd",
    calibration: Calibration | None = None,
    taylor_batches: int = 4,
) -> UNet2DModel:
    """A copy of a UNet teacher with ``ratio`` of the channels of every layer pruned away (a
    DiT teacher: ``ratio`` of every block's attention heads and MLP units, see ``_prune_dit``).

    Structured pruning with torch-pruning, layer by layer (no global ranking): the student
    keeps the teacher's weights at the surviving channels, and its input and output shapes
    ([B, C, H, W] as in ``example_shape``). ``importance`` ranks channels: "magnitude" (L2),
    "l1", "random" or "taylor" (|w * dL/dw| with the gradients of the diffusion loss on
    ``taylor_batches`` batches of ``calibration``, see ``_taylor_gradients``; the teacher gets
    none). ``groups`` (``GROUPINGS``): "gcd" prunes each layer's channels freely and regroups
    its GroupNorms after, each group keeping at least ``min_group_channels`` channels
    (``student_groups``); "teacher" keeps every GroupNorm's teacher group count and removes the
    same positions inside every group (Diff-Pruning's students), each group keeping at least one
    channel. Parameters shrink to about (1 - ratio)^2 of the teacher's (tables in the module
    docstring). The teacher is untouched; ratio 0 gives an exact copy.

    The student's ``config`` still describes the teacher (its widths are no longer uniform
    per level); save it with ``torch.save`` rather than ``save_pretrained``. Remove any
    FeatureTaps from the teacher first: the copy would carry their hooks along.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio!r}")
    _choice("importance", importance, IMPORTANCES)
    _choice("GroupNorm grouping", groups, GROUPINGS)
    _positive_int("taylor_batches", taylor_batches)
    if importance in NEEDS_DATA and calibration is None:
        raise ValueError(f"{importance} importance needs calibration data (models.Calibration: the training "
                         "split and the teacher's noise process)")
    if len(example_shape) != 4:
        raise ValueError(f"example_shape must be [B, C, H, W], got {tuple(example_shape)}")
    net = _unwrap(teacher)
    if isinstance(net, SD3Transformer2DModel):
        if groups != "gcd":
            raise ValueError(f"groups={groups!r} keeps a UNet's GroupNorm groups; an SD3 transformer has none (use 'gcd')")
        return _prune_sd3(net, ratio, importance, calibration, taylor_batches)
    if isinstance(net, DiTTransformer2DModel):
        if groups != "gcd":
            raise ValueError(f"groups={groups!r} keeps a UNet's GroupNorm groups; a DiT has none (use 'gcd')")
        return _prune_dit(net, ratio, example_shape, importance, calibration, taylor_batches)
    if not isinstance(net, (UNet2DModel, UNet2DConditionModel)):
        raise ValueError(
            f"prune_student supports UNet2DModel, UNet2DConditionModel and DiTTransformer2DModel teachers, got "
            f"{type(net).__name__}; use fresh_student instead"
        )
    student = copy.deepcopy(net)
    # torch-pruning traces its dependency graph through autograd: a frozen teacher (as
    # loaded for distillation) would silently prune nothing.
    frozen = {name for name, p in student.named_parameters() if not p.requires_grad}
    student.requires_grad_(True)
    if importance in NEEDS_DATA:
        # with the teacher's own GroupNorms, before the "gcd" grouping below changes the forward
        _taylor_gradients(student, calibration, taylor_batches)
    param = _first_param(student)
    example = (
        torch.randn(tuple(example_shape), device=param.device, dtype=param.dtype),
        torch.ones(example_shape[0], dtype=torch.long, device=param.device),
    )
    # The output conv's outputs are the image channels. The input conv's inputs and the time
    # embedding's first linear layer (fed by the parameter-free sinusoidal projection) have no
    # producer to prune, so they stay whole without being listed; so do cross-attention's key and
    # value inputs (the text encoder's width).
    ignored = [student.conv_out]
    forward = lambda model, inputs: model(*inputs).sample  # noqa: E731
    if isinstance(net, UNet2DConditionModel):
        # A transformer block's GEGLU feed-forward splits its first layer's outputs into a value
        # half and a gate half paired channel by channel; torch-pruning sees one layer and would
        # remove channels from either half unpaired (the halves no longer meeting as the teacher's
        # did), so its hidden units stay whole (its input and output widths follow the block's).
        ignored += [m for m in student.modules() if type(m).__name__ == "GEGLU"]
        context = torch.randn(example_shape[0], 2, net.config.cross_attention_dim, device=param.device, dtype=param.dtype)
        example = (*example, context)
        forward = lambda model, inputs: model(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample  # noqa: E731
    norms = {norm: norm.num_groups for norm in student.modules() if isinstance(norm, nn.GroupNorm)}
    if groups == "gcd":
        # torch-pruning removes whole GroupNorm groups only, which at high ratios prunes almost
        # nothing; with one group per norm every channel can go, and the groups come back after.
        for norm in norms:
            norm.num_groups = 1
        ratios = _narrow_layer_ratios(student, ratio)
    else:
        ratios = _narrow_group_ratios(student, ratio, example, forward, ignored)
    pruner = tp.pruner.BasePruner(
        student,
        example,
        importance=IMPORTANCES[importance](),
        pruning_ratio=ratio,
        pruning_ratio_dict=ratios,
        global_pruning=False,
        ignored_layers=ignored,
        forward_fn=forward,
    )
    pruner.step()
    for norm, original in norms.items():
        if groups == "gcd":
            norm.num_groups = student_groups(norm.num_channels, original, min_group_channels)
        elif norm.num_channels % original:
            raise ValueError(f"pruning left a GroupNorm with {norm.num_channels} channels, not a multiple of its "
                             f"{original} groups; use groups='gcd'")
    _sync_resampler_sizes(student)
    _sync_attention_sizes(student)
    student.zero_grad(set_to_none=True)  # Taylor's calibration gradients, pruned with the weights
    for name, p in student.named_parameters():
        p.requires_grad_(name not in frozen)
    # Tracing leaves the model in eval mode; give back the teacher's mode.
    return student.train(net.training)


def _taylor_gradients(model: nn.Module, calibration: Calibration, batches: int) -> None:
    """Accumulate into ``model``'s .grad the gradients of the diffusion training loss, MSE between
    its prediction and the process's target (the noise, for epsilon prediction) at random
    timesteps, over ``batches`` batches of ``TAYLOR_BATCH`` calibration images, in eval mode (no
    dropout, no DiT label dropout). Batches, timesteps and noise come from one generator seeded
    ``CALIBRATION_SEED``: the images are a fixed random sample of the split (drawn once, cycled
    if the split is smaller), so every run seed prunes the same student. Runs on the model's
    device; leaves the model in eval mode with its gradients set."""
    images, labels = calibration.images, calibration.labels
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"calibration images must be a non-empty [N, C, H, W] batch, got shape {tuple(images.shape)}")
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    size = min(TAYLOR_BATCH, len(images))
    order = torch.randperm(len(images), generator=generator)
    param = _first_param(model)
    model.eval().zero_grad(set_to_none=True)
    for b in range(batches):
        idx = order[(b * size + torch.arange(size)) % len(images)]
        x0 = images[idx].to(device=param.device, dtype=param.dtype)
        x_t, t, target = calibration.process.training_pair(x0, generator=generator)
        conditioned = labels is not None or calibration.captions is not None
        y = calibration.condition(idx).to(param.device) if conditioned else None
        loss = nn.functional.mse_loss(predict(model, x_t, t.to(param.device), y).float(), target.float())
        loss.backward()


def _narrow_group_ratios(model: nn.Module, ratio: float, example, forward_fn, ignored) -> dict[nn.Module, float]:
    """``_narrow_layer_ratios`` for pruning inside GroupNorm groups (groups="teacher").

    torch-pruning prunes a layer whose channels feed GroupNorms of g groups in the same positions
    of every group: it keeps int(width / g * (1 - ratio)) per group and skips the layer, leaving
    it whole, where that is none (unet-m at 0.9: 32- and 64-channel layers of 8 groups would keep
    0.4 and 0.8 channels per group). Such layers keep one channel per group instead. The group
    counts are read from torch-pruning's own dependency graph (a layer's channels can reach
    several norms, through skip connections and concatenations), as its pruner reads them.
    """
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, forward_fn=forward_fn)
    skipped = [m for layer in ignored for m in layer.modules()]
    ratios = {}
    for group in graph.get_all_groups(ignored_layers=skipped, root_module_types=[nn.Conv2d, nn.Linear]):
        channel_groups = max([dep.target.module.num_groups for dep, _ in group
                              if isinstance(dep.target.module, nn.GroupNorm)], default=1)
        width = graph.get_out_channels(group[0][0].target.module) // channel_groups
        if width * (1.0 - ratio) < 1.0:
            layers = [dep.target.module for dep, _ in group if isinstance(dep.target.module, (nn.Conv2d, nn.Linear))
                      and graph.is_out_channel_pruning_fn(dep.handler)]
            for layer in layers:
                # width * (1 - r) = 1.5 truncates to one kept channel per group, safe from rounding.
                ratios[layer] = max(0.0, 1.0 - 1.5 / width)
    return ratios


def set_dropout(model: nn.Module, p: float) -> int:
    """Set the dropout probability of every ResNet block of a UNet (diffusers' ResnetBlock2D,
    between its two convolutions; the authors' students train with 0.1); returns how many."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p!r}")
    blocks = [m for m in _unwrap(model).modules() if isinstance(m, ResnetBlock2D)]
    for block in blocks:
        block.dropout.p = float(p)
    return len(blocks)


def _prune_dit(net: DiTTransformer2DModel, ratio: float, example_shape: Sequence[int], importance: str,
               calibration: Calibration | None = None, taylor_batches: int = 4):
    """A copy of a DiT with ``ratio`` of every block's attention heads and MLP hidden units
    pruned away by torch-pruning (whole heads: the same heads of q, k and v, and the matching
    inputs of the output projection). The residual width, the embeddings, adaLN and the output
    layers stay whole, so parameters shrink less than the ratio (DiT-s at 0.5: ~75%); depth
    pruning (``keep_blocks``) removes the rest."""
    student = copy.deepcopy(net)
    student.requires_grad_(True)  # torch-pruning traces through autograd
    if importance in NEEDS_DATA:
        _taylor_gradients(student, calibration, taylor_batches)
    attentions = [m for m in student.modules() if isinstance(m, Attention)]
    prunable = {layer for attn in attentions for layer in (attn.to_q, attn.to_k, attn.to_v)}
    prunable |= {block.ff.net[0].proj for block in student.transformer_blocks}
    ignored = [m for m in student.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m not in prunable]
    heads = {layer: attn.heads for attn in attentions for layer in (attn.to_q, attn.to_k, attn.to_v)}
    param = _first_param(student)
    example = (torch.randn(tuple(example_shape), device=param.device, dtype=param.dtype),
               torch.ones(example_shape[0], dtype=torch.long, device=param.device),
               torch.zeros(example_shape[0], dtype=torch.long, device=param.device))
    # A block keeps at least one head and one MLP unit: torch-pruning skips a layer that would
    # keep none, leaving it whole. Its head count to remove comes from the one global head ratio
    # (a per-layer ratio is not used for heads), and DiT blocks all have the same heads; the
    # half head keeps float rounding from removing one head too many.
    most = max(attn.heads for attn in attentions) if attentions else 1
    keep = max(1, int(most * (1 - ratio)))
    pruner = tp.pruner.BasePruner(
        student, example, importance=IMPORTANCES[importance](), pruning_ratio=ratio,
        pruning_ratio_dict=_narrow_layer_ratios(student, ratio), global_pruning=False, ignored_layers=ignored,
        num_heads=heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=1 - (keep + 0.5) / most,
        forward_fn=lambda model, inputs: model(inputs[0], timestep=inputs[1], class_labels=inputs[2]).sample)
    pruner.step()
    _sync_attention_sizes(student)
    student.zero_grad(set_to_none=True)
    return student.train(net.training).requires_grad_(True)


def _prune_sd3(net: SD3Transformer2DModel, ratio: float, importance: str, calibration: Calibration | None,
               taylor_batches: int) -> SD3Transformer2DModel:
    """A copy of an SD3 transformer with ``ratio`` of every joint block's attention heads and of
    its two MLPs' hidden units (image and caption streams) removed, keeping the teacher's weights
    in the rest: at least one head and one unit each. A joint block's attention runs the image
    and caption tokens through one set of heads (their q, k and v concatenated along the
    sequence), so a head goes from all six projections at once and from both output
    projections' inputs; torch-pruning would see two unrelated streams, so the heads and units
    are ranked and sliced here. Scores per head or unit (over its rows of every projection):
    L2 ("magnitude") or L1 norm, |w * dL/dw| ("taylor", the diffusion loss's gradients on
    ``calibration``), or random (seed ``CALIBRATION_SEED``). The residual width, adaLN, the
    embeddings and the output layer stay whole."""
    student = copy.deepcopy(net)
    if any(getattr(block, "attn2", None) is not None for block in student.transformer_blocks):
        raise ValueError("pruning an SD3 transformer with dual attention layers (SD3.5's attn2) is not supported")
    if importance in NEEDS_DATA:
        student.requires_grad_(True)
        _taylor_gradients(student, calibration, taylor_batches)
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)

    def score(layers: list[nn.Linear], groups: int) -> torch.Tensor:
        """One score per group of rows (heads: groups of head_dim rows; units: single rows)."""
        total = 0
        for layer in layers:
            rows = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1) if layer.bias is not None \
                else layer.weight.detach()
            if importance == "taylor":
                grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1) if layer.bias is not None \
                    else layer.weight.grad
                part = (rows * grad).abs().sum(1)
            elif importance == "random":
                part = torch.rand(rows.shape[0], generator=generator)
            else:
                part = rows.abs().sum(1) if importance == "l1" else rows.square().sum(1)
            total = total + part.reshape(groups, -1).sum(1)
        return total

    def kept(scores: torch.Tensor) -> torch.Tensor:
        count = max(1, int(len(scores) * (1 - ratio) + 1e-9))
        return scores.topk(count).indices.sort().values

    def rows(layer: nn.Linear, index: torch.Tensor) -> None:
        layer.weight = nn.Parameter(layer.weight.detach()[index].clone())
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach()[index].clone())
        layer.out_features = len(index)

    def columns(layer: nn.Linear, index: torch.Tensor) -> None:
        layer.weight = nn.Parameter(layer.weight.detach()[:, index].clone())
        layer.in_features = len(index)

    for block in student.transformer_blocks:
        attn = block.attn
        projections = [attn.to_q, attn.to_k, attn.to_v, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj]
        head_dim = attn.to_q.out_features // attn.heads
        heads = kept(score(projections, attn.heads))
        index = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
        for layer in projections:
            rows(layer, index)
        for layer in (attn.to_out[0], getattr(attn, "to_add_out", None)):
            if layer is not None:
                columns(layer, index)
        attn.heads = len(heads)
        attn.inner_dim = attn.inner_kv_dim = len(index)
        for ff in (block.ff, getattr(block, "ff_context", None)):
            if ff is not None:
                units = kept(score([ff.net[0].proj], ff.net[0].proj.out_features))
                rows(ff.net[0].proj, units)
                columns(ff.net[2], units)
    student.zero_grad(set_to_none=True)
    return student.train(net.training).requires_grad_(True)


def keep_blocks(model: nn.Module, depth: int) -> nn.Module:
    """A copy of a DiT or SD3 transformer that keeps ``depth`` of its transformer blocks, evenly
    spaced from the first to the last (their weights untouched): depth pruning. (An SD3
    transformer's last block, which ends the caption stream, is always kept; at depth 1 it is
    the one kept.)"""
    net = _unwrap(model)
    if not isinstance(net, (DiTTransformer2DModel, SD3Transformer2DModel)):
        raise ValueError(f"depth pruning needs a DiTTransformer2DModel or SD3Transformer2DModel, got {type(net).__name__}")
    layers = len(net.transformer_blocks)
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= layers:
        raise ValueError(f"depth must be an integer in [1, {layers}], got {depth!r}")
    kept = sorted({round(i * (layers - 1) / max(1, depth - 1)) for i in range(depth)}) if depth > 1 else [0]
    if isinstance(net, SD3Transformer2DModel) and depth == 1:
        kept = [layers - 1]  # the block that ends the caption stream: another's caption outputs would go unused
    student = copy.deepcopy(net)
    student.transformer_blocks = nn.ModuleList([student.transformer_blocks[i] for i in kept])
    student.register_to_config(num_layers=depth)
    return student


# BK-SDM's block-removed students (Kim et al. 2023), each removing more of a text-to-image U-Net:
# "bk-base" one ResNet (+ attention) block fewer per stage, "bk-small" also no mid block,
# "bk-tiny" also no innermost stage (the last down stage and the first up stage).
BLOCK_REMOVALS = ("bk-base", "bk-small", "bk-tiny")


def block_plan(config, kind: str) -> tuple[dict, dict[str, str]]:
    """(the student's config, {student block prefix: teacher block prefix}) of a BK-SDM
    removal ``kind`` from a UNet2DConditionModel's config; ValueError naming what the layout
    cannot take. A down stage keeps its first L - 1 ResNet/attention pairs (L: the teacher's
    layers_per_block), an up stage its first L - 1 and its last (whose skip input comes from the
    stage above and has other widths); the innermost stage goes only where it is as wide as the
    stage beside it (so that every kept block keeps its weights' shapes)."""
    _choice("block removal", kind, BLOCK_REMOVALS)
    # diffusers would set the keys it lists in _use_default_values back to their defaults
    config = {k: v for k, v in dict(config).items() if k != "_use_default_values"}
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int) or layers < 2:
        raise ValueError(f"{kind} removes one of each stage's layers_per_block blocks; the teacher has "
                         f"layers_per_block {layers!r} (needs an integer >= 2)")
    widths = list(config.get("block_out_channels", ()))
    down, up = list(config.get("down_block_types", ())), list(config.get("up_block_types", ()))
    config["layers_per_block"] = layers - 1
    keep_down = list(range(layers - 1))
    keep_up = list(range(layers - 1)) + [layers]
    removed = 0
    if kind in ("bk-small", "bk-tiny"):
        config["mid_block_type"] = None
    if kind == "bk-tiny":
        if len(widths) < 3:
            raise ValueError(f"bk-tiny removes the innermost of the teacher's stages; it has "
                             f"{len(widths)} (needs 3 or more)")
        if widths[-1] != widths[-2]:
            raise ValueError(f"bk-tiny removes the innermost stage, which keeps the weights only where "
                             f"it is as wide as the stage beside it; the teacher's block_out_channels are {widths}")
        for key in ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block", "cross_attention_dim",
                    "only_cross_attention", "reverse_transformer_layers_per_block"):
            if isinstance(config.get(key), (list, tuple)):
                raise ValueError(f"bk-tiny: the teacher's {key} is set per stage, which this removal "
                                 "does not rewrite; use bk-small")
        widths, down, up, removed = widths[:-1], down[:-1], up[1:], 1
    config.update(block_out_channels=tuple(widths), down_block_types=tuple(down), up_block_types=tuple(up))
    plan = {}
    for i in range(len(down)):
        plan.update({f"down_blocks.{i}.{part}.{j}": f"down_blocks.{i}.{part}.{k}"
                     for part in ("resnets", "attentions") for j, k in enumerate(keep_down)})
        plan[f"down_blocks.{i}.downsamplers"] = f"down_blocks.{i}.downsamplers"
    for i in range(len(up)):
        plan.update({f"up_blocks.{i}.{part}.{j}": f"up_blocks.{i + removed}.{part}.{k}"
                     for part in ("resnets", "attentions") for j, k in enumerate(keep_up)})
        plan[f"up_blocks.{i}.upsamplers"] = f"up_blocks.{i + removed}.upsamplers"
    return config, plan


def remove_blocks(model: nn.Module, kind: str) -> UNet2DConditionModel:
    """A BK-SDM student (``BLOCK_REMOVALS``) of a UNet2DConditionModel teacher: a U-Net of fewer
    blocks (``block_plan``) holding the teacher's weights in every block it keeps (the teacher
    untouched). Any tensor whose shape differs from its teacher block's is refused."""
    net = _unwrap(model)
    if not isinstance(net, UNet2DConditionModel):
        raise ValueError(f"student.blocks removes a text-to-image U-Net's blocks; got a {type(net).__name__}")
    config, plan = block_plan(net.config, kind)
    with torch.device("meta"):
        student = UNet2DConditionModel.from_config(config)
    weights = net.state_dict()
    state = {}
    for name, tensor in student.state_dict().items():
        source = name
        for prefix, origin in plan.items():
            if name.startswith(prefix + "."):
                source = origin + name[len(prefix):]
                break
        if source not in weights or weights[source].shape != tensor.shape:
            have = tuple(weights[source].shape) if source in weights else "nothing"
            raise ValueError(f"{kind}: the student's {name} {tuple(tensor.shape)} has no teacher tensor "
                             f"of its shape ({source}: {have}); the teacher's layout cannot take this removal")
        state[name] = weights[source].detach().clone()
    student.load_state_dict(state, assign=True)
    return student.to(_first_param(net).device).train(net.training)


def block_tap_names(teacher: nn.Module, blocks: str | None) -> tuple[list[str], list[str]]:
    """(teacher's, student's) names of the stage outputs that feature objectives match, pair by
    pair: every stage for a student of the teacher's blocks; for a BK-SDM student the stages
    both have at the same resolution (a bk-tiny student's last down stage no longer
    downsamples, and its mid block and innermost stage are gone)."""
    names = default_tap_names(teacher)
    if blocks is None:
        return names, names
    net = _unwrap(teacher)
    config, _ = block_plan(net.config, blocks)
    stages = len(config["block_out_channels"])
    removed = len(net.down_blocks) - stages
    pairs = [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(stages - removed)]
    if config.get("mid_block_type") is not None:
        pairs.append(("mid_block", "mid_block"))
    pairs += [(f"up_blocks.{i + removed}", f"up_blocks.{i}") for i in range(stages)]
    return [t for t, _ in pairs], [s for _, s in pairs]


def student_groups(channels: int, teacher_groups: int, min_channels: int = 1) -> int:
    """The group count of a pruned GroupNorm with ``channels`` channels whose teacher had
    ``teacher_groups``: the largest count not above gcd(channels, teacher_groups) that divides
    ``channels`` and leaves each group at least ``min_channels`` channels (all of them where the
    norm keeps fewer). With 1 this is the gcd, the students every measured preset used.

    With one channel per group a GroupNorm normalises every channel alone: the 90%-pruned
    students of unet-xs and unet-s are left so (e.g. 4 channels in 4 groups) and did not learn
    (unet-s: FID 1,753 / 1,658 / 1,651 at 500 / 1,000 / 1,500 steps of kd); with at least 3
    channels per group, as unet-m's 90% students have everywhere, unet-s's learns, slowly (FID
    1,080 / 843 / 656 at the same steps; benchmarks/fid_curve.py, one seed; unet-m's student is
    at 159 / 88 / 24)."""
    if channels < 1 or teacher_groups < 1 or min_channels < 1:
        raise ValueError(f"channels, groups and min_channels must be >= 1, got {channels}, {teacher_groups}, {min_channels}")
    groups = math.gcd(channels, teacher_groups)
    floor = min(min_channels, channels)
    while channels // groups < floor:
        groups = max(d for d in range(1, groups) if channels % d == 0)
    return groups


def _narrow_layer_ratios(model: nn.Module, ratio: float) -> dict[nn.Module, float]:
    """Lower ratios for layers too narrow to keep any channel at ``ratio``.

    torch-pruning keeps int(width * (1 - ratio)) channels and silently skips a layer that
    would keep none, leaving it whole; these layers keep one channel instead.
    """
    ratios = {}
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            if width * (1.0 - ratio) < 1.0:
                # width * (1 - r) = 1.5 truncates to one kept channel, safe from rounding.
                ratios[module] = max(0.0, 1.0 - 1.5 / width)
    return ratios


def _sync_resampler_sizes(model: nn.Module) -> None:
    """Copy pruned conv sizes into Downsample2D/Upsample2D, whose forward asserts its input width.

    UNet2DModel builds every resampler with a conv, which carries the true widths.
    """
    for module in model.modules():
        if isinstance(module, (Downsample2D, Upsample2D)) and isinstance(module.conv, nn.Conv2d):
            module.channels = module.conv.in_channels
            module.out_channels = module.conv.out_channels


def _sync_attention_sizes(model: nn.Module) -> None:
    """Recompute each Attention's sizes and head count from its pruned projections.

    The forward splits the q/k/v width into ``heads`` equal parts, so the head count must
    divide the pruned width. It keeps the teacher's head width where the pruned width allows
    (fewer heads, not narrower ones), so the 1/sqrt(head_dim) logit scale stays close.
    """
    for attn in model.modules():
        if not isinstance(attn, Attention):
            continue
        head_dim = attn.inner_dim // attn.heads
        inner = attn.to_q.out_features
        most_heads = max(1, inner // head_dim)
        attn.heads = max(h for h in range(1, most_heads + 1) if inner % h == 0)
        attn.sliceable_head_dim = attn.heads
        attn.inner_dim = inner
        attn.inner_kv_dim = attn.to_k.out_features
        attn.query_dim = attn.to_q.in_features
        attn.out_dim = attn.to_out[0].out_features
        attn.scale = (inner // attn.heads) ** -0.5 if attn.scale_qk else 1.0


def build_student(teacher: nn.Module, student, *, seed: int, example_shape: Sequence[int],
                  calibration: Calibration | None = None) -> nn.Module:
    """The student a run's ``student`` settings (a StudentConfig) ask for: pruned from the
    teacher (deterministic, so a checkpoint needs no pickled module) or fresh, initialised from
    ``seed`` (a fresh student's init is part of the run's seed); with ``student.dropout``, its
    ResNet blocks' dropout. ``calibration`` (the run's training split and noise process) is what
    Taylor importance prunes by: needed then, unused otherwise."""
    dropout = getattr(student, "dropout", 0.0)
    if student.prune_ratio is not None:
        depth, blocks = getattr(student, "depth", None), getattr(student, "blocks", None)
        source = keep_blocks(teacher, depth) if depth is not None else teacher
        source = remove_blocks(source, blocks) if blocks is not None else source
        built = prune_student(source, student.prune_ratio, example_shape=example_shape, importance=student.importance,
                              min_group_channels=student.min_group_channels,
                              groups=getattr(student, "groups", "gcd"), calibration=calibration,
                              taylor_batches=getattr(student, "taylor_batches", 4))
    else:
        torch.manual_seed(seed)
        built = fresh_student(teacher, student.param_ratio)
    if dropout and not set_dropout(built, dropout):
        raise ValueError(f"student.dropout sets a UNet's ResNet blocks' dropout; a {type(built).__name__} has none")
    return built


def fresh_student(teacher: nn.Module, param_ratio: float) -> nn.Module:
    """A freshly initialised, narrower model of the teacher's family with ~param_ratio of its parameters.

    A UNet's widths (and time-embedding width) are scaled by one multiplier; a DiT's hidden
    size shrinks, keeping its head width up to the teacher's. Depth, resolution and every
    other setting stay the teacher's. The search picks the size nearest to the target and
    raises ValueError if that is more than 10% away.
    """
    if isinstance(param_ratio, bool) or not isinstance(param_ratio, (int, float)) or not 0.0 < param_ratio <= 1.0:
        raise ValueError(f"param_ratio must be in (0, 1], got {param_ratio!r}")
    net = _unwrap(teacher)
    if isinstance(net, UNet2DModel):
        candidates = _unet_width_candidates(dict(net.config))
    elif isinstance(net, DiTTransformer2DModel):
        candidates = _dit_width_candidates(dict(net.config))
    else:
        raise ValueError(f"teacher must be a UNet2DModel or DiTTransformer2DModel, got {type(net).__name__}")
    target = param_ratio * count_params(net)
    config, found = _nearest_candidate(type(net), candidates, target)
    if abs(found - target) > 0.1 * target:
        raise ValueError(
            f"cannot size a {type(net).__name__} to param_ratio {param_ratio} within 10%: "
            f"target {target:.0f} parameters, nearest {found}"
        )
    return type(net).from_config(config)


def _unet_width_candidates(config: dict) -> list[dict]:
    """UNet configs from narrowest to the teacher's width, the widest level one channel apart."""
    widths = config["block_out_channels"]
    widest = max(widths)
    candidates = []
    for step in range(1, widest + 1):
        scale = step / widest
        scaled = tuple(max(1, round(scale * w)) for w in widths)
        candidate = {**config, "block_out_channels": scaled}
        candidate["norm_num_groups"] = math.gcd(config["norm_num_groups"], *scaled)
        if config.get("attn_norm_num_groups") is not None:
            candidate["attn_norm_num_groups"] = math.gcd(config["attn_norm_num_groups"], *scaled)
        if config.get("attention_head_dim") is not None:
            # Every attention layer needs at least one head.
            candidate["attention_head_dim"] = min(config["attention_head_dim"], *scaled)
        if config.get("time_embedding_dim") is not None:
            candidate["time_embedding_dim"] = max(1, round(scale * config["time_embedding_dim"]))
        candidates.append(candidate)
    return candidates


def _dit_width_candidates(config: dict) -> list[dict]:
    """DiT configs for every reachable hidden size, smallest first, with the fewest heads
    whose width is at most the teacher's head width."""
    max_heads, max_head_dim = config["num_attention_heads"], config["attention_head_dim"]
    candidates = []
    # The 2-D sin-cos position embedding splits the hidden size in four.
    for hidden in range(4, max_heads * max_head_dim + 1, 4):
        heads = next((h for h in range(1, max_heads + 1) if hidden % h == 0 and hidden // h <= max_head_dim), None)
        if heads is not None:
            candidates.append({**config, "num_attention_heads": heads, "attention_head_dim": hidden // heads})
    return candidates


def _nearest_candidate(cls: type, candidates: list[dict], target: float) -> tuple[dict, int]:
    """The candidate whose parameter count is nearest to target, and that count.

    Candidates are ordered by size, so a binary search needs ~log2(len) model builds; they
    are built on the meta device, which allocates no memory.
    """

    def size(index: int) -> int:
        with torch.device("meta"):
            return count_params(cls.from_config(candidates[index]))

    low, high = 0, len(candidates) - 1
    while low < high:
        mid = (low + high) // 2
        if size(mid) < target:
            low = mid + 1
        else:
            high = mid
    options = [(abs(size(i) - target), i) for i in {max(low - 1, 0), low}]
    best = min(options)[1]
    return candidates[best], size(best)


def default_tap_names(model: nn.Module) -> list[str]:
    """Submodule names whose outputs FeatureTaps collects by default.

    UNet: each down block, the mid block and each up block. DiT: each transformer block.
    """
    net = _unwrap(model)
    if isinstance(net, (UNet2DModel, UNet2DConditionModel)):
        names = [f"down_blocks.{i}" for i in range(len(net.down_blocks))]
        names += ["mid_block"] if net.mid_block is not None else []
        return names + [f"up_blocks.{i}" for i in range(len(net.up_blocks))]
    if isinstance(net, (DiTTransformer2DModel, SD3Transformer2DModel)):
        return [f"transformer_blocks.{i}" for i in range(len(net.transformer_blocks))]
    raise ValueError(f"no default feature taps for {type(net).__name__}; pass names")


class FeatureTaps:
    """Collects the outputs of named submodules on every forward of the model.

    ``taps.features`` is a list of tensors [B, C, H, W], one per tap in name order, from the
    latest forward of the (unwrapped) model: each forward starts a fresh list. A submodule
    that returns a tuple (diffusers down blocks return (hidden, res_samples)) contributes its
    first element (an SD3 joint block's image tokens, its second). A DiT's (or SD3's) tokens [B, N, D] are laid back on their patch grid as
    [B, D, sqrt(N), sqrt(N)], so one 1x1-conv adapter serves both backbones. Features keep
    their autograd graph, so a feature loss can train through them.

    Names resolve on the model inside a DistributedDataParallel wrapper. Use as a context
    manager, or call ``remove()`` when done::

        with FeatureTaps(student) as taps:
            predict(student, x_t, t)
            loss = sum(f.square().mean() for f in taps.features)
    """

    def __init__(self, model: nn.Module, names: list[str] | None = None):
        self.model = _unwrap(model)
        self.names = default_tap_names(self.model) if names is None else list(names)
        if not self.names:
            raise ValueError("names must name at least one submodule, got an empty list")
        modules = [self._resolve(name) for name in self.names]
        self._tokens_to_grid = isinstance(self.model, (DiTTransformer2DModel, SD3Transformer2DModel))
        # an SD3 joint block returns (caption tokens, image tokens): the image tokens are its features
        self._pick = 1 if isinstance(self.model, SD3Transformer2DModel) else 0
        self._captured: dict[int, torch.Tensor] = {}
        self._handles = [self.model.register_forward_pre_hook(lambda module, args: self.clear())]
        self._handles += [module.register_forward_hook(self._keeper(i)) for i, module in enumerate(modules)]

    def _resolve(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"no submodule named {name!r} in {type(self.model).__name__}; choose from its named_modules()"
            ) from None

    def _keeper(self, index: int) -> Callable:
        def keep(module: nn.Module, args, output) -> None:
            if isinstance(output, (tuple, list)):
                output = output[self._pick]
            if self._tokens_to_grid and output.ndim == 3:
                batch, tokens, dim = output.shape
                side = math.isqrt(tokens)
                output = output.transpose(1, 2).reshape(batch, dim, side, side)
            self._captured[index] = output

        return keep

    @property
    def features(self) -> list[torch.Tensor]:
        """The tapped outputs of the latest forward, in name order."""
        return [self._captured[i] for i in sorted(self._captured)]

    def clear(self) -> None:
        """Forget the collected features (the next forward also does)."""
        self._captured = {}

    def channels(self) -> list[int]:
        """Channels of each tap, found by one no-grad forward of a batch-1 zero input.

        The features collected so far are kept. Pruned models need the forward: their
        config still lists the teacher's widths.
        """
        param = _first_param(self.model)
        side = self.model.config.sample_size
        height, width = (side, side) if isinstance(side, int) else side
        x = torch.zeros(1, self.model.config.in_channels, height, width, device=param.device, dtype=param.dtype)
        t = torch.zeros(1, dtype=torch.long, device=param.device)
        kept = self._captured
        with torch.no_grad():
            predict(self.model, x, t)
        found = [feature.shape[1] for feature in self.features]
        self._captured = kept
        return found

    def remove(self) -> None:
        """Remove every hook; ``features`` stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
