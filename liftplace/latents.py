"""Latent space: a frozen VAE's encoding of a data set, computed once and cached on disk.

A latent teacher (a denoiser trained on a VAE's latents) is distilled on latents: the images
are encoded once per data set, resolution and VAE, and the denoisers never see pixels until
samples are decoded for FID. Encoding takes the mean of the VAE's posterior (not a sample), so
that the same images and VAE always give the same latents, and scales it by the VAE's
``scaling_factor`` (the unit-variance convention of latent diffusion); ``decode`` undoes both.

``load_split`` gives what a run trains on: the images of its data set, or their latents when
its teacher is latent (``teachers.teacher_space``). The cache lives under
``$LIFTPLACE_CACHE/latents`` (default ``~/.cache/liftplace/latents``), shared by every run and
study on the machine: once a data set is encoded, later trials read it (trials that start
together wait on a lock file beside it while the first one encodes).

The cache is a safetensors file named by the content it came from: the SHA-256 of the VAE's
config and weight files and of the image and label tensors. A changed VAE or a changed image
gives another name, so a stale cache is never read; a cache file that does not hold what its
name says (damaged, cut short) is encoded again and replaced, with a line saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from liftplace import files

# Image pixels per VAE call when encoding or decoding (1,024 images of 16x16, 64 of 64x64, 4 of
# 256x256): bounds the VAE's activations at any resolution, where a fixed number of images per
# call would not (250 images of 256x256 in a Stable-Diffusion-sized VAE hold tens of GiB).
# ``vae_memory`` estimates a call: 1.4 GiB for an 84M-parameter SD-class VAE (the same at 64,
# 256 and 512 pixels), 0.1 GiB for the shipped dit-latent's. (The mid-block's attention over
# latent tokens is not bounded by this: it grows with the latents' side.)
ENCODE_PIXELS = 2**18


def vae_factor(config) -> int:
    """How many times smaller per side an AutoencoderKL's latents are than its images, from its
    config (a dict or ``vae.config``): it halves the resolution in every down block but the last."""
    return 2 ** (len(config.get("block_out_channels", [64])) - 1)


def chunk_size(pixels_per_image: int) -> int:
    """Images per VAE call for images of ``pixels_per_image`` pixels (height x width)."""
    return max(1, ENCODE_PIXELS // max(pixels_per_image, 1))


def vae_memory(vae, image_channels: int, size: int) -> int:
    """Bytes a latent run's frozen VAE holds at its peak: its weights, plus the activations of
    the larger of one encode and one decode call (no graph) at ``chunk_size`` images of
    ``image_channels`` x ``size`` x ``size``. Estimated without computing anything, on a "meta"
    copy under torch's MemTracker, as ``preflight.step_memory`` estimates a training step."""
    import copy

    from liftplace.models import meta_peak, weight_bytes

    vae = copy.deepcopy(vae).to("meta").requires_grad_(True)  # MemTracker hooks every parameter's gradient
    count, small = chunk_size(size * size), size // vae_factor(vae.config)
    with torch.no_grad():
        encode = meta_peak(lambda: vae.encode(torch.empty(count, image_channels, size, size, device="meta")), vae)
        decode = meta_peak(lambda: vae.decode(torch.empty(count, vae.config.latent_channels, small, small,
                                                          device="meta")), vae)
    return weight_bytes(vae) + max(encode, decode)


def cache_root() -> Path:
    """Where encoded data sets are cached (under LIFTPLACE_CACHE, as the FID statistics are)."""
    return Path(os.environ.get("LIFTPLACE_CACHE", Path.home() / ".cache" / "liftplace")) / "latents"


@dataclass
class Split:
    """A split of a run's data set, as its denoisers see it and as its metrics do."""

    images: torch.Tensor  # [N, C, H, W] in [-1, 1], at data.resolution
    x0: torch.Tensor  # what the denoisers learn from: the images, or their latents
    labels: torch.Tensor  # [N]
    num_classes: int
    name: str  # the data set's name (the key of its cached FID statistics)
    vae: object = None  # a latent teacher's VAE
    captions: object = None  # a text-to-image teacher's: the captions' embeddings (a text.Captions)

    def condition(self, idx: torch.Tensor) -> torch.Tensor | None:
        """What a denoiser is conditioned on for images ``idx``: their captions' embeddings [B, L, D]
        (a text-to-image teacher), their class labels [B] (a data set with classes), or None."""
        if self.captions is not None:
            return self.captions.embeddings(idx)
        return self.labels[idx] if self.num_classes else None

    def to_images(self, samples: torch.Tensor) -> torch.Tensor:
        """A denoiser's samples as images: decoded by the VAE in latent space."""
        return samples if self.vae is None else decode(self.vae, samples)


def load_split(config, split: str, space, vae, *, log: Callable[[str], object] = print) -> Split:
    """The ``split`` ("train" or "val") of ``config``'s data set for a teacher of ``space`` (a
    ``teachers.Space``, with its VAE from ``teachers.load_vae``): images loaded with the
    channels the teacher (or its VAE) reads, and in latent space their latents, encoded once
    and cached."""
    from liftplace.data import load_dataset
    from liftplace.metrics import stack_dataset

    dataset = load_dataset(config.data.spec, config.data.resolution, split, space.image_channels)
    images, labels = stack_dataset(dataset)
    x0 = cached_encode(vae, space.vae, images, labels, cache_root(), log=log) if space.latent else images
    captions = None
    if space.text is not None:
        from liftplace import text

        if getattr(dataset, "captions", None) is None:
            raise ValueError(f"data {config.data.spec} has no captions; a text-to-image teacher needs them (mnist-captions, "
                             "or folder:PATH with a metadata.jsonl of file_name and text)")
        captions = text.captions_of(space.text, dataset.captions, log=log)
    return Split(images, x0, labels, dataset.num_classes, dataset.name, vae if space.latent else None, captions)


def vae_fingerprint(vae_dir: str | Path) -> str:
    """SHA-256 over a saved VAE's config.json and weight files (names and bytes)."""
    vae_dir = Path(vae_dir)
    paths = sorted([vae_dir / "config.json", *vae_dir.glob("*.safetensors")])
    missing = [p.name for p in paths if not p.is_file()]
    if missing or len(paths) < 2:
        raise FileNotFoundError(f"VAE {vae_dir}: needs config.json and .safetensors weights "
                                f"(missing: {', '.join(missing) or 'weights'})")
    return files.digest_files(vae_dir, paths)


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor | None) -> str:
    """SHA-256 over the image tensor (shape, dtype, values) and the labels."""
    digest = hashlib.sha256()
    digest.update(b"labels" if labels is not None else b"no labels")
    for tensor in (images, labels if labels is not None else torch.empty(0)):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@torch.no_grad()
def encode(vae, images: torch.Tensor, *, batch: int | None = None) -> torch.Tensor:
    """Latents [N, c, h, w] of images [N, C, H, W] in [-1, 1]: the posterior mean, less the VAE's
    shift_factor where it has one (SD3's), times its scaling_factor, float32 on the CPU;
    ``batch`` images per call (default: ``chunk_size``)."""
    batch = batch or chunk_size(images.shape[-2] * images.shape[-1])
    device = next(vae.parameters()).device
    scale, shift = float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)
    out = [(vae.encode(chunk.to(device)).latent_dist.mean.float().cpu() - shift) * scale for chunk in images.split(batch)]
    return torch.cat(out)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, *, batch: int | None = None) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] from latents as ``encode`` returns them."""
    batch = batch or chunk_size(latents.shape[-2] * latents.shape[-1] * vae_factor(vae.config) ** 2)
    device = next(vae.parameters()).device
    scale, shift = float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)
    out = [vae.decode(chunk.to(device) / scale + shift).sample.float().clamp(-1, 1).cpu() for chunk in latents.split(batch)]
    return torch.cat(out)


def cached_encode(vae, vae_dir: str | Path, images: torch.Tensor, labels: torch.Tensor | None, cache_dir: str | Path,
                  *, log: Callable[[str], object] = print) -> torch.Tensor:
    """``encode(vae, images)``, read from ``cache_dir`` when these images were encoded by this
    VAE before (the VAE as saved in ``vae_dir``), else computed and written there."""
    # The VAE's dtype and device kind too: the same weights in float16, or on a GPU, give
    # (slightly) other latents.
    weight = next(vae.parameters())
    vae_key = f"{vae_fingerprint(vae_dir)}|{weight.dtype}|{weight.device.type}"
    shift = getattr(vae.config, "shift_factor", None)
    if shift:  # latents cached before the shift was applied were not shifted: they hold another key
        vae_key += f"|shift {float(shift)!r}"
    data_key = data_fingerprint(images, labels)
    key = hashlib.sha256(f"{vae_key}|{data_key}".encode()).hexdigest()
    path = Path(cache_dir) / f"latents-{key[:20]}.safetensors"
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    # Trials that start together on one machine take turns: the first encodes, the others wait
    # on the lock file and then read its result.
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            latents, why = _read(path, vae_key, data_key, len(images))
            if latents is not None:
                return latents
            log(f"latents: {path} {why}; encoding again")
        latents = encode(vae, images)
        metadata = {"vae": vae_key, "data": data_key, "count": str(len(images)),
                    "vae_dir": str(Path(vae_dir).resolve()), "scaling_factor": json.dumps(float(vae.config.scaling_factor))}
        files.atomic_write(path, lambda tmp: save_file({"latents": latents.contiguous()}, str(tmp), metadata=metadata))
    log(f"latents: encoded {len(images):,} images to {tuple(latents.shape[1:])} with {vae_dir}; cached in {path}")
    return latents


def _read(path: Path, vae_key: str, data_key: str, count: int) -> tuple[torch.Tensor | None, str]:
    """(latents, "") when path holds the latents of these keys, else (None, what is wrong)."""
    try:  # one open: the metadata, then the tensor
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            latents = handle.get_tensor("latents") if "latents" in handle.keys() else None
    except (SafetensorError, OSError, ValueError) as err:
        return None, f"cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    if metadata.get("vae") != vae_key or metadata.get("data") != data_key:
        return None, "holds another VAE's or data set's latents"
    if latents is None or latents.ndim != 4 or len(latents) != count or not bool(torch.isfinite(latents).all()):
        return None, "does not hold one finite latent per image"
    return latents, ""
