"""Latent space: a VAE's encoding, its inverse, and the content-keyed cache."""

import pytest
import torch

from liftplace import latents


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random AutoencoderKL (1 channel, downsampling 2x), saved as diffusers saves it."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                        layers_per_block=1, latent_channels=2, norm_num_groups=4, scaling_factor=0.5)
    out = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(str(out))
    return out


def load(vae_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(vae_dir), use_safetensors=True, local_files_only=True).eval()


def images(n=6, seed=0):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_is_the_scaled_posterior_mean_and_decode_undoes_the_scale(vae_dir):
    vae = load(vae_dir)
    x = images()
    z = latents.encode(vae, x, batch=4)  # two chunks
    assert z.shape == (6, 2, 8, 8)
    with torch.no_grad():
        assert torch.allclose(z, vae.encode(x).latent_dist.mean * 0.5, atol=1e-6)
        assert torch.allclose(latents.decode(vae, z, batch=4), vae.decode(z / 0.5).sample.clamp(-1, 1), atol=1e-6)
    assert torch.equal(latents.encode(vae, x, batch=4), z)  # the mean, not a sample: the same every time


def test_vae_calls_hold_a_bounded_number_of_pixels_at_any_resolution(vae_dir, monkeypatch):
    """encode and decode split their input so that no VAE call sees more than ENCODE_PIXELS
    image pixels, and the split does not change the result."""
    vae = load(vae_dir)
    monkeypatch.setattr(latents, "ENCODE_PIXELS", 3 * 16 * 16)  # three 16x16 images per call
    seen = []
    for name in ("encode", "decode"):
        real = getattr(vae, name)
        monkeypatch.setattr(vae, name, lambda x, _real=real: seen.append(x.shape) or _real(x))
    x = images(7)
    z = latents.encode(vae, x)
    assert [s[0] for s in seen] == [3, 3, 1]
    seen.clear()
    out = latents.decode(vae, z)  # latents of 8x8: the images they decode to are 16x16
    assert [s[0] for s in seen] == [3, 3, 1] and out.shape == x.shape
    assert torch.allclose(z, latents.encode(vae, x, batch=7), atol=1e-6)
    assert latents.chunk_size(256 * 256) == 1 and latents.chunk_size(16 * 16) == 3


def test_the_vae_memory_estimate_counts_one_call_of_the_chunk_size(vae_dir, monkeypatch):
    """vae_memory: the weights plus the larger call's activations, on meta tensors (no compute).
    A call holds a chunk of ENCODE_PIXELS pixels, so twice the pixels per call is about twice
    the activations."""
    vae = load(vae_dir)
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    one = latents.vae_memory(vae, 1, 16)
    assert weights + latents.ENCODE_PIXELS * 8 * 4 < one  # at least one float32 activation of 8 channels
    monkeypatch.setattr(latents, "ENCODE_PIXELS", 2 * latents.ENCODE_PIXELS)
    assert 1.8 < (latents.vae_memory(vae, 1, 16) - weights) / (one - weights) < 2.2
    assert all(p.device.type == "cpu" for p in vae.parameters())  # the VAE itself is untouched


def test_the_cache_is_read_back_and_is_keyed_on_the_vae_and_the_data(vae_dir, tmp_path, monkeypatch):
    vae = load(vae_dir)
    x, y = images(), torch.arange(6)
    cache = tmp_path / "cache"
    said = []
    calls = {"n": 0}
    encode = latents.encode

    def counting(*args, **kwargs):
        calls["n"] += 1
        return encode(*args, **kwargs)

    monkeypatch.setattr(latents, "encode", counting)
    first = latents.cached_encode(vae, vae_dir, x, y, cache, log=said.append)
    again = latents.cached_encode(vae, vae_dir, x, y, cache, log=said.append)
    assert calls["n"] == 1 and torch.equal(first, again) and len(list(cache.glob("*.safetensors"))) == 1
    assert "encoded 6 images to (2, 8, 8)" in said[0] and len(said) == 1
    (path,) = cache.glob("*.safetensors")  # beside it, its lock file
    # Another image, other labels, another VAE: encoded again, into another file.
    changed = x.clone()
    changed[3, 0, 5, 5] += 0.25
    latents.cached_encode(vae, vae_dir, changed, y, cache, log=said.append)
    latents.cached_encode(vae, vae_dir, x, y.flip(0), cache, log=said.append)
    other_dir = tmp_path / "vae2"
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.5)
    vae.save_pretrained(str(other_dir))
    moved = latents.cached_encode(vae, other_dir, x, y, cache, log=said.append)
    assert calls["n"] == 4 and len(list(cache.glob("*.safetensors"))) == 4 and not torch.allclose(moved, first)
    # A damaged cache file is encoded again and replaced, with a line saying so.
    path.write_bytes(path.read_bytes()[:100])
    vae = load(vae_dir)
    repaired = latents.cached_encode(vae, vae_dir, x, y, cache, log=said.append)
    assert calls["n"] == 5 and torch.equal(repaired, first) and "cannot be read (" in said[-2] and said[-2].endswith("; encoding again")
    assert latents.cached_encode(vae, vae_dir, x, y, cache, log=said.append) is not None and calls["n"] == 5
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_vae_directory_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="needs config.json and .safetensors weights"):
        latents.vae_fingerprint(tmp_path)


def test_trials_that_start_together_encode_a_data_set_once(vae_dir, tmp_path, monkeypatch):
    """Two callers at once: the second waits on the cache's lock while the first encodes (slowly
    here), then reads what it wrote."""
    import threading
    import time

    vae = load(vae_dir)
    x, y = images(), torch.arange(6)
    calls = []
    encode = latents.encode

    def slow(*args, **kwargs):
        calls.append(threading.current_thread().name)
        time.sleep(1.0)
        return encode(*args, **kwargs)

    monkeypatch.setattr(latents, "encode", slow)
    out, said = {}, []
    threads = [threading.Thread(target=lambda n=n: out.__setitem__(n, latents.cached_encode(
        vae, vae_dir, x, y, tmp_path / "cache", log=said.append)), name=f"trial{n}") for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(said) == 1 and torch.equal(out[0], out[1])


# --- a latent teacher: a DiTPipeline directory built and saved by diffusers' own classes -------

def dit_pipeline(out, *, latent_channels=4, clip_sample=False, scheduler=None, classes=10):
    """A tiny random class-conditional DiT (learned-sigma output, as DiT ships) on a 1-channel
    AutoencoderKL that halves the resolution: 16x16 digits -> 4x8x8 latents."""
    import diffusers

    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                          num_layers=2, sample_size=8, patch_size=2, norm_num_groups=4,
                                          num_embeds_ada_norm=classes)
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4)
    scheduler = scheduler or diffusers.DDIMScheduler(clip_sample=clip_sample)
    diffusers.DiTPipeline(transformer=dit, vae=vae, scheduler=scheduler).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def dit_pipe(tmp_path_factory):
    return dit_pipeline(tmp_path_factory.mktemp("pipelines") / "dit")


def latent_config(pipe, **overrides):
    from liftplace.config import resolve

    return resolve("smoke", {"teacher.name": str(pipe), "student.prune_ratio": None, "student.param_ratio": 0.5,
                             "train.steps": 4, "train.log_every": 2, "train.eval_every": 0, "eval.num_images": 8,
                             "eval.sampler_steps": 2, **overrides})


def test_a_dit_pipeline_distills_on_its_vae_latents_and_is_evaluated_on_decoded_images(dit_pipe, tmp_path, monkeypatch):
    from liftplace import distill, metrics
    from liftplace.checkpoints import load_student
    from liftplace.teachers import load_vae, teacher_process, teacher_space

    space = teacher_space(dit_pipe)
    assert (space.channels, space.size, space.image_channels, space.factor) == (4, 8, 1, 2)
    assert space.vae == dit_pipe / "vae" and space.resolution() == 16
    assert teacher_process(dit_pipe, "epsilon").clip is None  # the scheduler's clip_sample=False: latents unclipped
    config = latent_config(dit_pipe)
    run = distill.build({None: config})
    # the stream serves the VAE's latents of the training digits, as encode computes them
    vae = load_vae(space)
    train = latents.load_split(config, "train", space, vae, log=lambda _: None)
    assert train.images.shape[1:] == (1, 16, 16) and run.stream.images.shape[1:] == (4, 8, 8)
    assert torch.equal(run.stream.images, train.x0)
    assert torch.allclose(train.x0[:8], latents.encode(vae, train.images[:8]), atol=1e-5)
    # metrics compare decoded digits with the real ones: 1 channel, 16x16
    seen = []
    from liftplace import evaluate

    compute = evaluate.compute_metrics  # what distill's evaluation calls (evaluate.evaluate)
    monkeypatch.setattr(evaluate, "compute_metrics", lambda fake, real, *a, **k: seen.append((fake, real)) or compute(fake, real, *a, **k))
    rows, kept = [], tmp_path / "kept"

    def report(row, checkpoint):
        rows.append(row)
        if checkpoint is not None:
            import shutil
            shutil.copytree(checkpoint, kept, dirs_exist_ok=True)

    last = distill.run(config, report, log=lambda *_: None)
    fake, real = seen[-1]
    assert fake.shape == real.shape == (8, 1, 16, 16) and fake.min() >= -1 and fake.max() <= 1
    assert last["fid"] > 0 and last["student_params"] < last["teacher_params"]
    assert last["vae_params"] > 0 and last["vae_decode_macs"] > 0  # the VAE's cost, apart from the denoisers'
    from PIL import Image
    assert Image.open(kept / "samples.png").size[0] > 8 * 64  # decoded 16x16 digits, blown up 4x
    student, teacher, process = load_student(kept, config)
    x = torch.randn(2, 4, 8, 8)
    assert student(x, timestep=torch.tensor([5, 9]), class_labels=torch.tensor([1, 2])).sample.shape == (2, 8, 8, 8)
    assert metrics.cache_root().parent / "latents" == latents.cache_root()


def test_the_memory_check_counts_a_latent_teachers_vae(dit_pipe, monkeypatch):
    """A latent run's step estimate is the denoisers' step on latents plus the VAE's weights
    and one encode/decode call, both times the margin."""
    from liftplace import preflight
    from liftplace.teachers import load_teacher, load_vae, teacher_space

    monkeypatch.setattr(preflight, "_STEPS", {})
    config = latent_config(dit_pipe, **{"train.batch": 16})
    step, _ = preflight._step_estimate(config, exact=False)
    space = teacher_space(dit_pipe)
    denoiser = preflight.step_memory(load_teacher(str(dit_pipe))[0], (16, 4, 8, 8))
    vae = latents.vae_memory(load_vae(space), 1, 16)
    assert step == pytest.approx((denoiser + vae) * preflight.STEP_MARGIN) and vae > denoiser / 100


def test_a_latent_pipeline_that_cannot_serve_is_refused_in_one_line(dit_pipe, tmp_path):
    from liftplace.preflight import check_inputs

    with pytest.raises(ValueError) as err:
        latent_config(dit_pipe, **{"data.resolution": 8})
    assert str(err.value) == (f"data.resolution: 8 does not match the latent teacher's images: its sample size 8 is "
                              f"2x smaller per side than the images its VAE encodes ({dit_pipe / 'vae'}); "
                              "set data.resolution=16")
    # more classes in the data than the transformer embeds: refused before Ray, naming both
    few = dit_pipeline(tmp_path / "few", classes=5)
    with pytest.raises(ValueError, match=r"^data.spec: mnist has 10 classes, more than the 5 that teacher .*few embeds"):
        check_inputs([latent_config(few)], log=lambda _: None)
    wrong = dit_pipeline(tmp_path / "wrong", latent_channels=3)
    with pytest.raises(ValueError, match=r"^teacher.name: teacher .*vae/config.json: latent_channels 3 differs from "
                                         r"the denoiser's in_channels 4$"):
        latent_config(wrong)
    # a VAE whose weights do not fit its config: refused before Ray by the input check
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(dit_pipe, broken)
    config_file = broken / "vae" / "config.json"
    config_file.write_text(config_file.read_text().replace('"layers_per_block": 1', '"layers_per_block": 2'))
    with pytest.raises(ValueError, match=r"^teacher.name: teacher VAE .*broken/vae: config.json does not match its weights"):
        check_inputs([latent_config(broken)], log=lambda _: None)


def test_a_flow_matching_dit_pipeline_distills_as_rectified_flow_with_its_shift(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from liftplace import distill
    from liftplace.teachers import teacher_process

    pipe = dit_pipeline(tmp_path / "flow", scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    with pytest.raises(ValueError, match=r"^teacher.prediction: 'epsilon', but the teacher's .*scheduler_config.json is a "
                                         r"FlowMatchEulerDiscreteScheduler \(rectified flow, velocity prediction\): "
                                         r"set teacher.prediction=flow$"):
        latent_config(pipe)
    process = teacher_process(pipe, "flow")
    assert (process.prediction, process.shift, process.clip) == ("flow", 3.0, None)
    # sampling feeds the model the shifted timesteps diffusers' own scheduler steps through
    seen = []
    process.sample(lambda x, t: seen.append(t[0].item()) or torch.zeros_like(x), (1, 4, 8, 8), steps=4)
    theirs, plain = FlowMatchEulerDiscreteScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler()
    theirs.set_timesteps(4)
    plain.set_timesteps(4)
    assert torch.allclose(torch.tensor(seen), theirs.timesteps) and not torch.allclose(theirs.timesteps, plain.timesteps)
    # sigma' = shift * sigma / (1 + (shift - 1) * sigma) over an even grid from 1 to the smallest
    # training sigma, itself already shifted (diffusers shifts that end twice)
    def shifted(sigma):
        return 3 * sigma / (1 + 2 * sigma)

    grid = torch.linspace(1, shifted(torch.tensor(1 / 1000)).item(), 4)
    torch.testing.assert_close(theirs.timesteps / 1000, shifted(grid))
    config = latent_config(pipe, **{"teacher.prediction": "flow"})
    last = distill.run(config, lambda row, checkpoint: None, log=lambda *_: None)
    assert last["step"] == 4 and last["fid"] > 0 and not last["diverged"]
    # a scheduler setting the sampler does not follow is refused, naming it
    file = pipe / "scheduler" / "scheduler_config.json"
    file.write_text(file.read_text().replace('"use_dynamic_shifting": false', '"use_dynamic_shifting": true'))
    with pytest.raises(ValueError, match=r"^teacher.name: teacher .*scheduler_config.json: use_dynamic_shifting True is "
                                         r"not supported; sampling follows a fixed shift only$"):
        latent_config(pipe, **{"teacher.prediction": "flow"})


def test_a_study_on_a_latent_teacher_runs_and_reports_on_decoded_images(ray_session, dit_pipe, tmp_path):
    """ablate_k as cohorts on a DiT pipeline (Ray Tune), then its whole report: the error maps
    and the linear correction work on latents, FIDs on decoded digits."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("study_ablate_k_latent", root / "studies" / "ablate_k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = module.study_main(module.STUDY, [
        "--preset", "smoke", "--seeds", "1", "--storage", str(tmp_path), "--set", f"teacher.name={dit_pipe}",
        "--set", "student.prune_ratio=0.5", "--set", "train.steps=10",
        "--set", "eval.num_images=32", "--set", "eval.sampler_steps=2"])
    from liftplace.results import load_study, summarize

    summary = summarize(load_study(folder))
    assert len(summary) == len(module.STUDY.variants) and summary["final_fid"].notna().all()
    assert (summary["denoiser_size"] == 8).all() and (summary["vae_params"] > 0).all()
    report = (folder / "analysis" / "REPORT.md").read_text()
    assert "**Latent space.**" in report and "Not built" not in report
    for figure in ("error_maps.png", "linear_correction.png", "fid_vs_k.png", "headline.png"):
        assert (folder / "analysis" / figure).is_file()
    sys.modules.pop("study_ablate_k_latent", None)


def test_a_vaes_shift_factor_is_taken_off_before_the_scale_and_keys_its_cache(vae_dir, tmp_path):
    """SD3's VAE convention: latents = (mean - shift_factor) * scaling_factor; decode undoes it,
    and the cache holds the shifted latents."""
    import json
    import shutil

    shifted = tmp_path / "shifted"
    shutil.copytree(vae_dir, shifted)
    config = json.loads((shifted / "config.json").read_text())
    (shifted / "config.json").write_text(json.dumps({**config, "shift_factor": 0.25}))
    plain, moved = load(vae_dir), load(shifted)
    x = images()
    with torch.no_grad():
        mean = plain.encode(x).latent_dist.mean
    z = latents.encode(moved, x)
    assert torch.allclose(z, (mean - 0.25) * 0.5, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(latents.decode(moved, z), moved.decode(z / 0.5 + 0.25).sample.clamp(-1, 1), atol=1e-6)
    cache = tmp_path / "cache"
    for _ in range(2):  # encoded, then read back
        assert torch.equal(latents.cached_encode(moved, shifted, x, None, cache, log=lambda *_: None), z)
