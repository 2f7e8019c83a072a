"""The recipes: a trained teacher, VAE or extractor is written whole, reloads and is never overwritten."""

import json

import pytest

from liftplace import latents, models, recipes
from liftplace.recipes import train_teacher

CARD_KEYS = {
    "arch", "size", "data", "resolution", "prediction", "steps", "batch", "lr", "seed", "train_wall_time_s",
    "params", "macs", "fid", "kid", "precision", "recall", "eval_num_images", "eval_sampler_steps", "eval_seed",
    "eval_extractor", "command",
}


@pytest.fixture(scope="module")
def tiny_teacher(tiny_teacher_dir):
    return tiny_teacher_dir, json.loads((tiny_teacher_dir / "card.json").read_text())


# --- teachers ---------------------------------------------------------------------------------

def test_training_writes_a_complete_directory(tiny_teacher):
    out, card = tiny_teacher
    assert {p.name for p in out.iterdir()} >= {"config.json", "diffusion_pytorch_model.safetensors", "card.json", "samples.png"}
    assert CARD_KEYS <= set(card)
    assert json.loads((out / "card.json").read_text()) == card
    assert card["params"] == models.count_params(models.build_unet("tiny"))
    assert card["eval_extractor"] == "digits-cnn" and card["eval_num_images"] == 20


def test_training_refuses_to_overwrite(tiny_teacher):
    out, _ = tiny_teacher
    with pytest.raises(FileExistsError, match="not empty"):
        train_teacher(out, size="tiny", steps=1, progress=False)


# --- a VAE and a latent teacher on it ---------------------------------------------------------

def test_a_vae_and_a_latent_dit_trained_here_make_a_pipeline_that_loads_by_its_shipped_name(tmp_path, monkeypatch):
    from liftplace import teachers
    from liftplace.metrics import Protocol
    from liftplace.models import count_params

    protocol = Protocol(num_images=16, sampler_steps=2)
    card = recipes.train_vae(tmp_path / "vae", steps=3, batch=8, protocol=protocol, progress=False, command="test")
    assert card["latent_shape"] == [4, 8, 8] and card["params"] > 0 and card["recon_fid"] > 0
    vae = teachers.load_vae_dir(tmp_path / "vae")
    from liftplace.data import load_dataset
    from liftplace.metrics import stack_dataset
    images, _ = stack_dataset(load_dataset("mnist", 16, "train"))
    # scaling_factor makes the training latents unit-variance, as latent diffusion wants them
    assert abs(float(latents.encode(vae, images).std()) - 1) < 1e-3
    with pytest.raises(ValueError, match="a latent teacher is a DiT"):
        recipes.train_teacher(tmp_path / "unet", arch="unet", vae=tmp_path / "vae")
    out = tmp_path / "shipped" / "dit-latent-test"
    card = recipes.train_teacher(out, arch="dit", size="tiny", steps=3, batch=8, protocol=protocol, progress=False,
                                 command="test", vae=tmp_path / "vae")
    assert card["latent_shape"] == [4, 8, 8] and card["vae_params"] == count_params(vae)
    assert (out / "vae" / "card.json").is_file() and (out / "samples.png").is_file()
    assert json_of(out / "model_index.json")["_class_name"] == "DiTPipeline"
    assert json_of(out / "scheduler" / "scheduler_config.json")["clip_sample"] is False
    # shipped: found by its name, read as a latent pipeline, its card beside model_index.json
    monkeypatch.setattr(teachers, "TEACHERS_DIR", tmp_path / "shipped")
    assert "dit-latent-test" in teachers.shipped_teachers()
    assert teachers.teacher_path("dit-latent-test") == out / "transformer"
    space = teachers.teacher_space("dit-latent-test")
    assert space.latent and space.vae == out / "vae" and space.resolution() == 16
    model, loaded_card = teachers.load_teacher("dit-latent-test")
    assert loaded_card["fid"] == card["fid"] and teachers.teacher_process("dit-latent-test", "epsilon").clip is None


def json_of(path):
    return json.loads(path.read_text())


# --- the FID extractor ------------------------------------------------------------------------

def test_the_extractor_recipe_saves_weights_that_load_and_a_card_with_their_accuracy(tmp_path):
    from liftplace.data import load_dataset
    from liftplace.metrics import load_extractor, stack_dataset

    out = tmp_path / "extractor.safetensors"
    said = []
    card = recipes.train_extractor("digits", 16, epochs=1, out=out, log=said.append)
    assert len(said) == 1 and said[0].startswith("epoch 1/1")
    images, labels = stack_dataset(load_dataset("digits", 16, "val"))
    extractor = load_extractor(out)
    assert card["accuracy"] == round(recipes.classifier_accuracy(extractor, images, labels), 4)
    assert (card["data"], card["epochs"], card["val_images"]) == ("digits", 1, len(images))
    assert json.loads(out.with_suffix(".json").read_text()) == card
