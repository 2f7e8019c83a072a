"""Teachers: training writes a complete, reloadable directory; shipped teachers load and sample."""

import json

import pytest
import torch

from liftplace import models
from liftplace.diffusion import make_process
from liftplace.teachers import generate, load_teacher, shipped_teachers, train_teacher

CARD_KEYS = {
    "arch", "size", "data", "resolution", "prediction", "steps", "batch", "lr", "seed", "train_wall_time_s",
    "params", "macs", "fid", "kid", "precision", "recall", "eval_num_images", "eval_sampler_steps", "eval_seed",
    "eval_extractor", "command",
}


@pytest.fixture(scope="module")
def tiny_teacher(tiny_teacher_dir):
    return tiny_teacher_dir, json.loads((tiny_teacher_dir / "card.json").read_text())


def test_training_writes_a_complete_directory(tiny_teacher):
    out, card = tiny_teacher
    assert {p.name for p in out.iterdir()} >= {"config.json", "diffusion_pytorch_model.safetensors", "card.json", "samples.png"}
    assert CARD_KEYS <= set(card)
    assert json.loads((out / "card.json").read_text()) == card
    assert card["params"] == models.count_params(models.build_unet("tiny"))
    assert card["eval_extractor"] == "digits-cnn" and card["eval_num_images"] == 20


def test_saved_teacher_reloads_with_the_same_outputs(tiny_teacher):
    out, _ = tiny_teacher
    model, card = load_teacher(out)
    again, _ = load_teacher(str(out))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(models.predict(model, x, t), models.predict(again, x, t))
    assert card["size"] == "tiny"


def test_training_refuses_to_overwrite(tiny_teacher):
    out, _ = tiny_teacher
    with pytest.raises(FileExistsError, match="not empty"):
        train_teacher(out, size="tiny", steps=1, progress=False)


def test_load_refuses_missing_and_unsafe_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a directory nor a shipped teacher"):
        load_teacher(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_teacher(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        load_teacher(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    with pytest.raises(ValueError, match="unsupported model class"):
        load_teacher(tmp_path)


SHIPPED = shipped_teachers()


def test_the_cpu_preset_teachers_are_shipped():
    assert {"unet-xs", "unet-s", "unet-m", "unet-l", "dit-s"} <= set(SHIPPED)
    params = [load_teacher(f"unet-{s}")[1]["params"] for s in ("xs", "s", "m", "l")]
    assert params == sorted(params) and params[-1] / params[0] > 8


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_teacher_loads_samples_and_has_a_complete_card(name):
    model, card = load_teacher(name)
    assert CARD_KEYS <= set(card)
    assert card["params"] == models.count_params(model)
    images = generate(model, make_process(card["prediction"]), 4, steps=2, seed=0, num_classes=card["num_classes"])
    assert images.shape == (4, card["channels"], card["resolution"], card["resolution"])
    assert images.min() >= -1 and images.max() <= 1
