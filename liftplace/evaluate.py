"""Sampling and metrics, for teachers and students alike.

``generate`` draws a fixed set of samples from any denoiser (a teacher, a student, or a
student's corrected prediction through ``predict_fn``) with the noise process's sampler, one
seed per chunk; ``evaluate`` compares a model's samples with the validation split's images
under a ``metrics.Protocol`` (a latent model's samples decoded by its VAE first) and returns
FID, KID, precision and recall. The metrics themselves (torch-fidelity, the feature
extractors, the cached reference statistics) are ``liftplace.metrics``'.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel

from liftplace import latents, models
from liftplace.data import load_dataset
from liftplace.metrics import Protocol, compute_metrics, real_images


def generate(model, process, n: int, *, steps: int, seed: int, num_classes: int = 0, batch: int = 250,
             device: str | torch.device = "cpu", predict_fn=None) -> torch.Tensor:
    """n samples [n, C, H, W] in [-1, 1]; chunk i uses seed + i, so a seed fixes the set.

    A class-conditional model gets labels cycling through its classes. predict_fn(x_t, t,
    *labels), when given, replaces the model's own prediction (e.g. a corrected student);
    model then only fixes the sample shape.
    """
    net = models._unwrap(model)
    shape = (net.config.in_channels, net.config.sample_size, net.config.sample_size)
    fn = predict_fn or (lambda x, t, *y: models.predict(model, x, t, *y))
    out = []
    for i, start in enumerate(range(0, n, batch)):
        b = min(batch, n - start)
        labels = None
        if isinstance(net, DiTTransformer2DModel):
            labels = torch.arange(start, start + b, device=device) % max(1, num_classes)
        out.append(process.sample(fn, (b, *shape), steps=steps, seed=seed + i, device=device, labels=labels).cpu())
    return torch.cat(out)


def evaluate(model, process, data: str, resolution: int, protocol: Protocol, *, num_classes: int = 0,
             device="cpu", vae=None) -> dict:
    """FID/KID/precision/recall of a model's samples against the validation split (a latent
    model's samples decoded by ``vae`` first)."""
    channels = vae.config.in_channels if vae is not None else models.in_channels(model)
    val = load_dataset(data, resolution, "val", channels)
    real = real_images(val, protocol.num_images)
    fake = generate(model, process, protocol.num_images, steps=protocol.sampler_steps, seed=protocol.seed,
                    num_classes=num_classes, device=device)
    if vae is not None:
        fake = latents.decode(vae, fake)
    return compute_metrics(fake, real, protocol, real_cache_key=val.name)
