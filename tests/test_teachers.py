"""Teachers: a trained directory reloads; shipped teachers and pipelines load and sample; bad ones are refused."""

import json

import pytest
import torch

from liftplace import latents, models
from liftplace.diffusion import make_process
from liftplace.evaluate import generate
from liftplace.teachers import load_teacher, load_vae, shipped_teachers, teacher_process, teacher_space
from test_recipes import CARD_KEYS  # what a recipe writes on a teacher's card


@pytest.fixture(scope="module")
def tiny_teacher(tiny_teacher_dir):
    return tiny_teacher_dir, json.loads((tiny_teacher_dir / "card.json").read_text())


def test_saved_teacher_reloads_with_the_same_outputs(tiny_teacher):
    out, _ = tiny_teacher
    model, card = load_teacher(out)
    again, _ = load_teacher(str(out))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(models.predict(model, x, t), models.predict(again, x, t))
    assert card["size"] == "tiny"


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
    assert {"unet-xs", "unet-s", "unet-m", "unet-l", "dit-s", "dit-latent", "unet-m-glyphs"} <= set(SHIPPED)
    # the glyph teacher was measured with the glyph data set's own extractor
    card = load_teacher("unet-m-glyphs")[1]
    assert (card["data"], card["eval_data"], card["num_classes"]) == ("glyphs", "glyphs", 52)
    params = [load_teacher(f"unet-{s}")[1]["params"] for s in ("xs", "s", "m", "l")]
    assert params == sorted(params) and params[-1] / params[0] > 8


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_teacher_loads_samples_and_has_a_complete_card(name):
    model, card = load_teacher(name)
    assert CARD_KEYS <= set(card)
    assert card["params"] == models.count_params(model)
    # a latent teacher (a pipeline with its VAE) samples latents, decoded into the card's images
    space = teacher_space(name)
    process = teacher_process(name, card["prediction"])
    images = generate(model, process, 4, steps=2, seed=0, num_classes=card["num_classes"])
    if space.latent:
        assert images.shape[1:] == (space.channels, space.size, space.size) and process.clip is None
        images = latents.decode(load_vae(space), images)
    assert images.shape == (4, card["channels"], card["resolution"], card["resolution"])
    assert images.min() >= -1 and images.max() <= 1


# --- pipeline directories (model_index.json), built with diffusers' own classes ---------------

def _ddpm_pipeline(tmp_path, teacher_dir, *, pipeline="DDPMPipeline", **scheduler):
    """The tiny teacher's UNet inside a pipeline saved by diffusers (save_pretrained), with a
    scheduler of the given settings."""
    import diffusers

    unet = diffusers.UNet2DModel.from_pretrained(str(teacher_dir), use_safetensors=True, local_files_only=True)
    scheduler_cls = getattr(diffusers, scheduler.pop("cls", "DDPMScheduler"))
    pipe = getattr(diffusers, pipeline)(unet=unet, scheduler=scheduler_cls(**scheduler))
    out = tmp_path / f"pipe-{len(list(tmp_path.iterdir()))}"
    pipe.save_pretrained(str(out))
    return out, unet


def test_a_ddpm_pipeline_loads_with_the_noise_process_its_scheduler_names(tiny_teacher_dir, tmp_path):
    from diffusers import DDPMScheduler

    from liftplace.teachers import PredictionMismatch, teacher_path, teacher_process

    settings = dict(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    pipe, unet = _ddpm_pipeline(tmp_path, tiny_teacher_dir, **settings)
    assert teacher_path(pipe) == pipe / "unet"
    model, card = load_teacher(pipe)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(models.predict(model, x, torch.tensor([3, 400])), models.predict(unet.eval(), x, torch.tensor([3, 400])))
    assert card == {}  # a pipeline carries no card
    (pipe / "unet" / "card.json").write_text('{"fid": 7.5}')  # a card in the model's folder is read
    assert load_teacher(pipe)[1] == {"fid": 7.5}
    (pipe / "card.json").write_text('{"fid": 6.5}')  # one beside model_index.json comes first
    assert load_teacher(pipe)[1] == {"fid": 6.5}
    process = teacher_process(pipe, "v")
    # The noise levels are the scheduler's own (cosine, T = 500), not the default linear ones.
    expected = DDPMScheduler(**settings).alphas_cumprod
    assert process.num_train_timesteps == 500 and torch.allclose(process.scheduler.alphas_cumprod, expected)
    assert not torch.allclose(make_process("v").scheduler.alphas_cumprod[:500], expected)
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    x_t, t, target = process.training_pair(x0, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)  # the same draws: levels, then noise
    level = torch.randint(0, 500, (4,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    reference = DDPMScheduler(**settings)
    assert torch.equal(t, level) and torch.allclose(x_t, reference.add_noise(x0, noise, level))
    assert torch.allclose(target, reference.get_velocity(x0, noise, level))
    samples = process.sample(lambda x, t: models.predict(model, x, t), (2, 1, 16, 16), steps=3, seed=0)
    assert samples.shape == (2, 1, 16, 16) and torch.isfinite(samples).all()
    with pytest.raises(PredictionMismatch, match=r"prediction_type 'v_prediction': set teacher.prediction=v"):
        teacher_process(pipe, "epsilon")


def test_pipelines_and_schedulers_that_cannot_be_distilled_are_refused_naming_the_file(tiny_teacher_dir, tmp_path):
    import diffusers

    from liftplace.config import resolve

    def refusal(pipe, prediction="epsilon"):
        with pytest.raises((ValueError, FileNotFoundError)) as err:  # resolve validates
            resolve("smoke", {"teacher.name": str(pipe), "teacher.prediction": prediction})
        message = str(err.value)
        assert "\n" not in message
        return message

    # A latent pipeline of a layout not supported yet (a VQ autoencoder), saved by diffusers.
    unet = diffusers.UNet2DModel.from_pretrained(str(tiny_teacher_dir), use_safetensors=True, local_files_only=True)
    vq = diffusers.VQModel(in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                           latent_channels=1, norm_num_groups=4, num_vq_embeddings=8, vq_embed_dim=1)
    latent = tmp_path / "ldm-pipe"
    diffusers.LDMPipeline(vqvae=vq, unet=unet, scheduler=diffusers.DDIMScheduler()).save_pretrained(str(latent))
    message = refusal(latent)
    assert message.startswith("teacher.name: teacher ") and str(latent / "model_index.json") in message
    assert "_class_name 'LDMPipeline' is a latent pipeline with a VQ autoencoder" in message
    assert "DiTPipeline, StableDiffusionPipeline, StableDiffusion3Pipeline (latent space)" in message
    # Schedulers: a class, a prediction type and a beta schedule that cannot be used, and a
    # prediction type that differs from teacher.prediction (which value to set).
    pipe, _ = _ddpm_pipeline(tmp_path, tiny_teacher_dir, cls="ScoreSdeVeScheduler")  # variance exploding
    assert "scheduler_config.json: _class_name 'ScoreSdeVeScheduler' is not supported" in refusal(pipe)
    pipe, _ = _ddpm_pipeline(tmp_path, tiny_teacher_dir, prediction_type="sample")
    assert "prediction_type 'sample' is not supported" in refusal(pipe)
    pipe, _ = _ddpm_pipeline(tmp_path, tiny_teacher_dir)
    config_file = pipe / "scheduler" / "scheduler_config.json"
    config_file.write_text(config_file.read_text().replace('"linear"', '"cubic"'))
    assert "cubic" in refusal(pipe) and str(config_file) in refusal(pipe)
    pipe, _ = _ddpm_pipeline(tmp_path, tiny_teacher_dir, pipeline="DDIMPipeline", cls="DDIMScheduler",
                             prediction_type="v_prediction")
    assert refusal(pipe).startswith("teacher.prediction: 'epsilon', but the teacher's ")
    resolve("smoke", {"teacher.name": str(pipe), "teacher.prediction": "v"})  # accepted
    (pipe / "model_index.json").write_text("{not json")
    assert "model_index.json: not valid JSON" in refusal(pipe, "v")
    # What would only fail inside a worker, after training: a learned variance (the UNet
    # predicts twice its channels), betas that do not cover T, more sampler steps than T,
    # zero terminal SNR with epsilon.
    pipe, _ = _ddpm_pipeline(tmp_path, tiny_teacher_dir, variance_type="learned_range")
    assert "variance_type 'learned_range' (a learned variance) is not supported" in refusal(pipe)
    pipe, _ = _ddpm_pipeline(tmp_path, tiny_teacher_dir, num_train_timesteps=10, trained_betas=[0.01] * 5)
    assert "trained_betas has 5 values for num_train_timesteps 10" in refusal(pipe)
    pipe, _ = _ddpm_pipeline(tmp_path, tiny_teacher_dir, num_train_timesteps=20)
    with pytest.raises(ValueError, match=r"^eval.sampler_steps: 50 is more than the teacher's 20 training timesteps$"):
        resolve("smoke", {"teacher.name": str(pipe), "eval.sampler_steps": 50})
    pipe, _ = _ddpm_pipeline(tmp_path, tiny_teacher_dir, rescale_betas_zero_snr=True)
    assert "rescale_betas_zero_snr needs v prediction" in refusal(pipe)
    unet_dir = tmp_path / "two-out"
    import diffusers

    twice = diffusers.UNet2DModel(**{**diffusers.UNet2DModel.load_config(str(tiny_teacher_dir)), "out_channels": 2})
    twice.save_pretrained(str(unet_dir))
    assert "its UNet predicts 2 channels from 1 (a learned variance?)" in refusal(unet_dir)


def test_every_schedule_diffusers_trains_with_also_samples(tiny_teacher_dir, tmp_path):
    """DDIM knows fewer beta_schedule names than DDPM ("sigmoid"): sampling runs on the training
    scheduler's own noise levels, for the default schedule exactly as before."""
    from diffusers import DDIMScheduler

    model, _ = load_teacher(tiny_teacher_dir)
    for schedule in ({"beta_schedule": "sigmoid"}, {"beta_schedule": "squaredcos_cap_v2"}, {"beta_end": 0.012}):
        process = make_process("epsilon", 1000, schedule)
        sampler = process._sampling_scheduler()
        assert torch.equal(sampler.alphas_cumprod, process.scheduler.alphas_cumprod)
        out = process.sample(lambda x, t: models.predict(model, x, t), (2, 1, 16, 16), steps=4)
        assert torch.isfinite(out).all()
    default = make_process("v")._sampling_scheduler()
    before = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                           prediction_type="v_prediction", set_alpha_to_one=True)
    assert torch.equal(default.alphas_cumprod, before.alphas_cumprod) and default.final_alpha_cumprod == before.final_alpha_cumprod


def test_relative_paths_are_made_absolute_for_the_workers(tiny_teacher_dir, tmp_path, monkeypatch):
    """Ray Train's workers and Tune's trials run in folders of their own: a teacher or data
    folder given relative to where the command runs is passed on as an absolute path."""
    import shutil

    from liftplace.config import resolve

    shutil.copytree(tiny_teacher_dir, tmp_path / "mine")
    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    config = resolve("smoke", {"teacher.name": "mine", "data.spec": "folder:imgs"}, check_paths=False)
    assert config.teacher.name == str(tmp_path / "mine") and config.data.spec == f"folder:{tmp_path / 'imgs'}"
    assert resolve("smoke", {"teacher.name": "unet-xs"}).teacher.name == "unet-xs"  # a shipped name stays a name
    with pytest.raises(FileNotFoundError, match="teacher not found: missing-dir is neither"):
        resolve("smoke", {"teacher.name": "missing-dir"})  # refused in the user's own words


def test_a_pipeline_teacher_distills_under_its_own_noise_process(tiny_teacher_dir, tmp_path):
    from liftplace import distill
    from liftplace.config import resolve

    pipe, _ = _ddpm_pipeline(tmp_path, tiny_teacher_dir, num_train_timesteps=400, beta_end=0.03)
    config = resolve("smoke", {"teacher.name": str(pipe), "student.prune_ratio": 0.5, "train.steps": 4,
                               "train.log_every": 2, "train.eval_every": 0, "eval.num_images": 8,
                               "eval.sampler_steps": 2})
    run = distill.build({None: config})
    assert run.stream.process.num_train_timesteps == 400 and run.stream.process.schedule["beta_end"] == 0.03
    rows = []
    last = distill.run(config, lambda row, checkpoint: rows.append(row), log=lambda *_: None)
    assert [r["step"] for r in rows] == [2, 4] and not last["diverged"] and last["fid"] > 0


def test_a_checkpoint_is_refused_after_its_teachers_files_changed(tiny_teacher_dir, tmp_path):
    """The teacher's fingerprint covers its weights, configs and scheduler config, not its card;
    a checkpoint keeps it, and resuming after an edit of scheduler_config.json (which the run's
    config does not show) is refused in one line, before and inside the run. A checkpoint from
    before fingerprints still resumes."""
    import json
    import shutil

    from liftplace import checkpoints, distill
    from liftplace.config import resolve
    from liftplace.teachers import teacher_fingerprint

    pipe, _ = _ddpm_pipeline(tmp_path, tiny_teacher_dir)
    first = teacher_fingerprint(pipe)
    (pipe / "card.json").write_text("{}")
    assert teacher_fingerprint(pipe) == first  # the card describes the teacher, it is not the teacher
    config = resolve("smoke", {"teacher.name": str(pipe), "student.prune_ratio": 0.5, "train.steps": 4,
                               "train.log_every": 2, "train.checkpoint_every": 2, "train.eval_every": 0,
                               "eval.num_images": 8, "eval.sampler_steps": 2})
    kept = tmp_path / "kept"

    def report(row, checkpoint):
        if checkpoint is not None and not kept.exists():
            shutil.copytree(checkpoint, kept)  # step 2's

    distill.run(config, report, log=lambda *_: None)
    assert json.loads((kept / "state.json").read_text())["teacher_fingerprint"] == first
    schedule = pipe / "scheduler" / "scheduler_config.json"
    settings = json.loads(schedule.read_text())
    schedule.write_text(json.dumps({**settings, "beta_end": 0.03}))
    assert teacher_fingerprint(pipe) != first
    digest = checkpoints.config_digest(config.to_dict())
    with pytest.raises(ValueError, match=r"^the checkpoint .* was trained with other teacher files than teacher\.name"):
        checkpoints.check(kept, digest, teacher_fingerprint(pipe))
    with pytest.raises(ValueError, match="other teacher files"):
        distill.run(config, lambda *_: None, kept, log=lambda *_: None)
    schedule.write_text(json.dumps(settings))
    assert checkpoints.check(kept, digest, teacher_fingerprint(pipe)) == 2  # the same files again: accepted
    state = json.loads((kept / "state.json").read_text())
    del state["teacher_fingerprint"]
    (kept / "state.json").write_text(json.dumps(state))
    schedule.write_text(json.dumps({**settings, "beta_end": 0.03}))
    rows = []
    distill.run(config, lambda row, checkpoint: rows.append(row), kept, log=lambda *_: None)
    assert [r["step"] for r in rows] == [4]  # older checkpoints carry no fingerprint: not checked
