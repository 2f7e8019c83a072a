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
from liftplace.metrics import DEFAULT_EXTRACTOR, Protocol, clip_score, compute_metrics, load_extractor, real_images


def generate(model, process, n: int, *, steps: int, seed: int, num_classes: int = 0, batch: int = 250,
             device: str | torch.device = "cpu", predict_fn=None, captions=None, guidance: float = 1.0) -> torch.Tensor:
    """n samples [n, C, H, W] in [-1, 1]; chunk i uses seed + i, so a seed fixes the set.

    A class-conditional model gets labels cycling through its classes; a text-to-image one the
    embeddings of ``captions`` (a ``text.Captions``), sample i those of caption row i (cycling),
    with classifier-free guidance at ``guidance`` (``guided``). predict_fn(x_t, t, *labels),
    when given, replaces the model's own prediction (e.g. a corrected student); model then only
    fixes the sample shape.
    """
    net = models._unwrap(model)
    shape = (net.config.in_channels, net.config.sample_size, net.config.sample_size)
    fn = predict_fn or (lambda x, t, *y: models.predict(model, x, t, *y))
    if captions is not None:
        fn = guided(fn, captions.null.to(device), guidance)
    out = []
    for i, start in enumerate(range(0, n, batch)):
        b = min(batch, n - start)
        labels = None
        if captions is not None:
            labels = captions.embeddings(torch.arange(start, start + b) % len(captions))
        elif isinstance(net, DiTTransformer2DModel):
            labels = torch.arange(start, start + b, device=device) % max(1, num_classes)
        out.append(process.sample(fn, (b, *shape), steps=steps, seed=seed + i, device=device, labels=labels).cpu())
    return torch.cat(out)


def guided(fn, null: torch.Tensor, scale: float):
    """Classifier-free guidance of a caption-conditioned prediction ``fn(x_t, t, context)``:
    u + scale * (c - u), c with the captions' context and u with the empty caption's ``null``
    [L, D] (both in one batch of twice the size). At scale 1 that is c, and ``fn`` is returned
    as it is (no unconditional pass), as diffusers skips it at guidance_scale <= 1."""
    if scale == 1.0:
        return fn

    def predict(x, t, context):
        both = fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null.expand_as(context).to(context), context]))
        uncond, cond = both.chunk(2)
        return uncond + scale * (cond - uncond)

    return predict


def evaluate(model, process, data: str, resolution: int, protocol: Protocol, *, num_classes: int = 0,
             device="cpu", vae=None, text=None) -> dict:
    """FID/KID/precision/recall of a model's samples against the validation split (a latent
    model's samples decoded by ``vae`` first). A text-to-image model (``text``: its pipeline
    directory) samples the validation captions, guided at ``protocol.guidance_scale``; where the
    validation images have digit labels and the extractor is a digit classifier, the row also
    has ``text_alignment``: the share of samples it reads as the digit their caption names; with
    ``protocol.clip_weights``, ``clip_score`` (``metrics.clip_score``) against their captions."""
    channels = vae.config.in_channels if vae is not None else models.in_channels(model)
    val = load_dataset(data, resolution, "val", channels)
    real = real_images(val, protocol.num_images)
    captions = None
    if text is not None:
        from liftplace.text import captions_of

        if getattr(val, "captions", None) is None:
            raise ValueError(f"data {data} has no captions; a text-to-image teacher needs them")
        captions = captions_of(text, val.captions)
    fake = generate(model, process, protocol.num_images, steps=protocol.sampler_steps, seed=protocol.seed,
                    num_classes=num_classes, device=device, captions=captions, guidance=protocol.guidance_scale)
    if vae is not None:
        fake = latents.decode(vae, fake)
    result = compute_metrics(fake, real, protocol, real_cache_key=val.name)
    if captions is not None and protocol.extractor == DEFAULT_EXTRACTOR and val.num_classes:
        result["text_alignment"] = text_alignment(fake, val, protocol)
    if captions is not None and protocol.clip_weights:
        wanted = [val.captions[i % len(val.captions)] for i in range(len(fake))]
        result["clip_score"] = clip_score(fake, wanted, protocol.clip_path())
    return result


def text_alignment(fake: torch.Tensor, val, protocol: Protocol) -> float:
    """The share of ``fake`` (sample i drawn for validation caption i, cycling) that the
    protocol's digit classifier reads as validation image i's label: the digit its caption names."""
    classifier = load_extractor(protocol.weights_path())
    labels = torch.tensor([int(val[i][1]) for i in range(len(val))])
    wanted = labels[torch.arange(len(fake)) % len(labels)]
    with torch.no_grad():
        read = torch.cat([classifier(chunk)[1].argmax(1) for chunk in fake.split(500)])
    return float((read == wanted).float().mean())
