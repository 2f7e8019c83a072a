"""Sampling and metrics: a seed fixes the samples, whoever samples; a model's metrics are those of its samples."""

import pytest
import torch

from liftplace import evaluate, latents
from liftplace.data import load_dataset
from liftplace.diffusion import make_process
from liftplace.evaluate import generate
from liftplace.metrics import Protocol, compute_metrics, real_images
from liftplace.teachers import load_teacher, load_vae, teacher_process, teacher_space


@pytest.fixture(scope="module")
def tiny(tiny_teacher_dir):
    return load_teacher(tiny_teacher_dir)[0], make_process("epsilon")


def test_a_seed_fixes_the_samples_and_chunk_i_uses_seed_plus_i(tiny):
    model, process = tiny
    whole = generate(model, process, 4, steps=2, seed=3, batch=2)
    assert whole.shape == (4, 1, 16, 16) and whole.min() >= -1 and whole.max() <= 1
    assert torch.equal(whole, generate(model, process, 4, steps=2, seed=3, batch=2))
    assert torch.equal(whole, torch.cat([generate(model, process, 2, steps=2, seed=3),
                                         generate(model, process, 2, steps=2, seed=4)]))
    assert not torch.equal(whole, generate(model, process, 4, steps=2, seed=4, batch=2))


def test_predict_fn_replaces_the_models_prediction(tiny):
    model, process = tiny
    zero = generate(model, process, 2, steps=2, seed=0, predict_fn=lambda x, t, *y: torch.zeros_like(x))
    assert torch.equal(zero, process.sample(lambda x, t: torch.zeros_like(x), (2, 1, 16, 16), steps=2, seed=0))
    assert not torch.equal(zero, generate(model, process, 2, steps=2, seed=0))


def test_a_class_conditional_model_gets_labels_cycling_through_its_classes(monkeypatch):
    model, card = load_teacher("dit-s")
    process = teacher_process("dit-s", card["prediction"])
    seen = []
    sample = type(process).sample
    monkeypatch.setattr(type(process), "sample", lambda self, fn, shape, **k: seen.append(k["labels"]) or
                        sample(self, fn, shape, **k))
    generate(model, process, 5, steps=1, seed=0, num_classes=3, batch=4)
    assert [labels.tolist() for labels in seen] == [[0, 1, 2, 0], [1]]


def test_evaluate_measures_the_models_samples_against_the_validation_split(tiny):
    model, process = tiny
    protocol = Protocol(num_images=8, sampler_steps=2, prc=False)
    val = load_dataset("mnist", 16, "val", 1)
    expected = compute_metrics(generate(model, process, 8, steps=2, seed=0), real_images(val, 8), protocol,
                               real_cache_key=val.name)
    assert evaluate.evaluate(model, process, "mnist", 16, protocol) == expected


def test_a_latent_models_samples_are_decoded_before_they_are_measured(monkeypatch):
    model, card = load_teacher("dit-latent")
    space = teacher_space("dit-latent")
    process, vae = teacher_process("dit-latent", card["prediction"]), load_vae(space)
    seen = []
    monkeypatch.setattr(evaluate, "compute_metrics", lambda fake, real, *a, **k: seen.append((fake, real)) or {})
    evaluate.evaluate(model, process, card["data"], card["resolution"], Protocol(num_images=4, sampler_steps=1),
                      num_classes=card["num_classes"], vae=vae)
    (fake, real), = seen
    assert fake.shape == real.shape == (4, card["channels"], card["resolution"], card["resolution"])
    latent = generate(model, process, 4, steps=1, seed=0, num_classes=card["num_classes"])
    assert latent.shape[1:] == (space.channels, space.size, space.size)
    assert torch.equal(fake, latents.decode(vae, latent))
