"""Text-to-image: a Stable Diffusion pipeline as teacher, captions and their cached embeddings,
BK-SDM block-removed students, classifier-free guidance, and a study on a tiny pipeline.

Every pipeline here is built in the test by diffusers' and transformers' own classes (a
character-level CLIPTokenizer, a small CLIPTextModel, a UNet2DConditionModel, the shipped VAE):
nothing is downloaded."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from liftplace import models, recipes, text
from liftplace.config import resolve
from liftplace.data import CAPTION_TEMPLATES, DIGIT_WORDS, load_dataset
from liftplace.teachers import TEACHERS_DIR

VAE = TEACHERS_DIR / "dit-latent" / "vae"  # the shipped 1-channel VAE: 16x16 digits -> 4 x 8 x 8


def make_pipeline(out: Path, *, size: str = "tiny", hidden: int = 32, layers_per_block: int | None = None,
                  widths=None) -> Path:
    torch.manual_seed(0)
    unet = models.build_sd_unet(size, in_channels=4, resolution=8, cross_attention_dim=hidden)
    if layers_per_block is not None or widths is not None:
        config = {k: v for k, v in dict(unet.config).items() if k != "_use_default_values"}
        config.update({k: v for k, v in (("layers_per_block", layers_per_block), ("block_out_channels", widths))
                       if v is not None})
        unet = type(unet).from_config(config)
    return recipes.save_text_pipeline(out, unet, VAE, max_length=24)


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    return make_pipeline(tmp_path_factory.mktemp("sd") / "sd-tiny")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFTPLACE_CACHE", str(tmp_path / "cache"))


def edited(pipe: Path, out: Path, config: str, **changes) -> Path:
    """A copy of a pipeline at ``out`` whose JSON file ``config`` (relative) has ``changes``."""
    shutil.copytree(pipe, out)
    file = out / config
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    return out


def sd_config(pipe, **overrides):
    return resolve("smoke", {"teacher.name": str(pipe), "data.spec": "mnist-captions", "student.prune_ratio": 0.0,
                             **overrides})


# --- captions ------------------------------------------------------------------------------

def test_the_builtin_captioned_set_names_each_image_digit():
    train, val = (load_dataset("mnist-captions", 16, split) for split in ("train", "val"))
    plain = load_dataset("mnist", 16, "val")
    assert torch.equal(val.images, plain.images) and torch.equal(val.labels, plain.labels)
    assert len(train.captions) == len(train) and len(val.captions) == len(val)
    templates = {t.format(word=DIGIT_WORDS[d], digit=d): d for t in CAPTION_TEMPLATES for d in range(10)}
    assert all(templates[c] == int(y) for c, y in zip(val.captions, val.labels))
    assert len(set(val.captions)) == len(templates)  # every template is used
    assert load_dataset("mnist-captions", 16, "val").captions == val.captions  # fixed per image
    assert load_dataset("mnist", 16, "val").captions is None


def folder_with_captions(root: Path, lines) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        Image.new("L", (16, 16), color=40 * i).save(root / f"img{i}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def test_a_folder_reads_captions_from_metadata_jsonl_and_refuses_a_missing_column(tmp_path):
    good = folder_with_captions(tmp_path / "good", [{"file_name": f"img{i}.png", "text": f"shade {i}"} for i in range(4)])
    train, val = (load_dataset(f"folder:{good}", 16, split) for split in ("train", "val"))
    assert train.captions == ["shade 0", "shade 1", "shade 2"] and val.captions == ["shade 3"]
    bad = folder_with_captions(tmp_path / "bad", [{"file_name": f"img{i}.png", "label": 1} for i in range(4)])
    images = load_dataset(f"folder:{bad}", 16, "train")  # a teacher without text never reads the captions
    assert len(images) == 3
    with pytest.raises(ValueError, match=r"metadata.jsonl line 1: no 'text' column \(a string\)"):
        images.captions
    with pytest.raises(ValueError, match=r"^data.spec: .*metadata.jsonl line 1: no 'text' column"):
        sd_config(make_pipeline(tmp_path / "sd"), **{"data.spec": f"folder:{bad}"})
    short = folder_with_captions(tmp_path / "short", [{"file_name": "img0.png", "text": "x"}])
    with pytest.raises(ValueError, match=r"metadata.jsonl: 2 of the 3 images have no line; the first: .*img1.png$"):
        load_dataset(f"folder:{short}", 16, "train").captions


def test_cached_embeddings_equal_the_encoders_output_and_are_read_back(sd_pipe, tmp_path, monkeypatch):
    captions = ["a handwritten seven", "number one", "a handwritten seven", "", "nine"]
    got = text.captions_of(sd_pipe, captions, log=lambda *_: None)
    tokenizer, encoder = text.load_encoder(sd_pipe)
    ids = tokenizer(captions, padding="max_length", max_length=24, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = encoder(ids).last_hidden_state
    assert torch.allclose(got.embeddings(torch.arange(5)), expected, atol=1e-6)
    assert got.texts[0] == "" and torch.allclose(got.null, expected[3], atol=1e-6)
    assert got.table.shape[0] == 4  # distinct captions only
    # A second call reads the cache: the encoder is never loaded.
    def loaded(*args, **kwargs):
        raise RuntimeError("the encoder was loaded")

    monkeypatch.setattr(text, "load_encoder", loaded)
    again = text.captions_of(sd_pipe, captions, log=lambda *_: None)
    assert torch.equal(again.table, got.table) and torch.equal(again.index, got.index)
    cached = list((tmp_path / "cache" / "text").glob("captions-*.safetensors"))
    assert len(cached) == 1
    with pytest.raises(RuntimeError, match="the encoder was loaded"):  # other captions: another key
        text.captions_of(sd_pipe, ["number two"], log=lambda *_: None)


def test_captions_longer_than_the_tokenizer_are_truncated_and_said(sd_pipe):
    said = []
    long = "a handwritten seven written very carefully"  # 40 characters: more than 24 tokens
    got = text.captions_of(sd_pipe, [long, "seven"], log=said.append)
    assert any("1 of the 3 distinct captions are longer than the tokenizer's 24 tokens and are truncated" in line
               for line in said)
    tokenizer, encoder = text.load_encoder(sd_pipe)
    ids = tokenizer([long], padding="max_length", max_length=24, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, 24)
    with torch.no_grad():
        assert torch.allclose(got.embeddings(torch.tensor([0]))[0], encoder(ids).last_hidden_state[0], atol=1e-6)


# --- the teacher ---------------------------------------------------------------------------

def test_a_stable_diffusion_pipeline_is_a_latent_text_teacher(sd_pipe):
    from liftplace.teachers import load_teacher, teacher_process, teacher_space

    space = teacher_space(sd_pipe)
    assert space.latent and space.text == sd_pipe and space.channels == 4 and space.resolution() == 16
    model, _ = load_teacher(sd_pipe)
    assert type(model).__name__ == "UNet2DConditionModel"
    assert teacher_process(sd_pipe, "epsilon").clip is None  # latents are not clipped
    sd_config(sd_pipe)  # validates


def test_a_pipeline_whose_parts_do_not_fit_is_refused_in_one_line(sd_pipe, tmp_path):
    wide = edited(sd_pipe, tmp_path / "wide", "text_encoder/config.json", hidden_size=48)
    with pytest.raises(ValueError, match=r"^teacher.name: teacher .*text_encoder/config.json: the text encoder's "
                                         r"hidden_size 48 differs from the U-Net's cross_attention_dim 32"):
        sd_config(wide)
    bare = tmp_path / "bare"
    shutil.copytree(sd_pipe, bare)
    (bare / "tokenizer" / "merges.txt").unlink()
    sd_config(bare)  # tokenizer.json is enough (transformers 5 saves only that)
    (bare / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"^teacher.name: teacher .*: its tokenizer folder .*tokenizer lacks "
                                                r"merges.txt and tokenizer.json"):
        sd_config(bare)
    with pytest.raises(ValueError, match=r"^teacher.name: teacher .*unet: a UNet2DConditionModel is conditioned on text "
                                         r"encoders' embeddings; give its StableDiffusionPipeline \(or "
                                         r"StableDiffusion3Pipeline\) directory"):
        sd_config(sd_pipe / "unet")
    with pytest.raises(ValueError, match=r"^data.spec: mnist has no captions; a text-to-image teacher needs them"):
        sd_config(sd_pipe, **{"data.spec": "mnist"})
    with pytest.raises(ValueError, match=r"^eval.guidance_scale: classifier-free guidance needs a text-to-image "
                                         r"teacher; unet-xs is not one"):
        resolve("smoke", {"eval.guidance_scale": 3.0})
    with pytest.raises(ValueError, match=r"^student.blocks: BK-SDM block removal needs a text-to-image U-Net teacher"):
        resolve("smoke", {"student.blocks": "bk-base"})
    with pytest.raises(ValueError, match=r"^student.blocks: unknown block removal 'bk-huge'"):
        sd_config(sd_pipe, **{"student.blocks": "bk-huge"})
    with pytest.raises(ValueError, match=r"^student.param_ratio: .* is a text-to-image UNet2DConditionModel: its "
                                         r"students are pruned"):
        sd_config(sd_pipe, **{"student.prune_ratio": None, "student.param_ratio": 0.5})
    with pytest.raises(ValueError, match=r"^eval.guidance_scale: must be a finite number >= 0 \(1: unguided\), got -1"):
        resolve("smoke", {"teacher.name": str(sd_pipe), "data.spec": "mnist-captions", "eval.guidance_scale": -1.0},
                check_paths=False)
    endless = tmp_path / "endless"
    shutil.copytree(sd_pipe, endless)
    file = endless / "tokenizer" / "tokenizer_config.json"
    file.write_text(json.dumps({k: v for k, v in json.loads(file.read_text()).items() if k != "model_max_length"}))
    with pytest.raises(ValueError, match=r"^teacher.name: teacher .*: its tokenizer/tokenizer_config.json gives no "
                                         r"model_max_length"):
        sd_config(endless)


def test_a_text_to_image_teacher_recipe_refuses_what_it_cannot_save_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"--prediction epsilon or v, not 'flow'"):
        recipes.train_teacher(tmp_path / "a", arch="sd", size="tiny", vae=VAE, data="mnist-captions", prediction="flow")
    with pytest.raises(ValueError, match=r"unknown text-to-image U-Net size 'm'"):
        recipes.train_teacher(tmp_path / "b", arch="sd", size="m", vae=VAE, data="mnist-captions")
    with pytest.raises(ValueError, match=r"data mnist has no captions"):
        recipes.train_teacher(tmp_path / "c", arch="sd", size="tiny", vae=VAE, data="mnist", steps=1)
    assert not any(tmp_path.iterdir())


# --- BK-SDM students -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", models.BLOCK_REMOVALS)
def test_a_block_removed_student_holds_its_teachers_weights_in_the_kept_blocks(sd_pipe, kind):
    from liftplace.teachers import load_teacher

    teacher, _ = load_teacher(sd_pipe)
    student = models.remove_blocks(teacher, kind)
    t = teacher.state_dict()
    _, plan = models.block_plan(teacher.config, kind)
    checked = 0
    for name, tensor in student.state_dict().items():
        source = next((origin + name[len(prefix):] for prefix, origin in plan.items() if name.startswith(prefix + ".")),
                      name)
        assert torch.equal(tensor, t[source]), name
        checked += "resnets" in name
    assert checked > 0
    assert all(len(block.resnets) == 1 for block in student.down_blocks)  # teacher: 2
    assert all(len(block.resnets) == 2 for block in student.up_blocks)  # teacher: 3
    # the up stages keep their first and last ResNet blocks (the last reads the skip from above)
    assert plan["up_blocks.0.resnets.1"].endswith("resnets.2")
    assert (student.mid_block is None) == (kind != "bk-base")
    assert len(student.down_blocks) == len(teacher.down_blocks) - (kind == "bk-tiny")
    assert models.count_params(student) < models.count_params(teacher)
    x, t_ = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    context = torch.randn(2, 5, 32)
    assert models.predict(student, x, t_, context).shape == x.shape
    # the feature objectives' stage outputs pair up at equal shapes
    teacher_names, student_names = models.block_tap_names(teacher, kind)
    with models.FeatureTaps(teacher, teacher_names) as tt, models.FeatureTaps(student, student_names) as st:
        models.predict(teacher, x, t_, context)
        models.predict(student, x, t_, context)
        assert [f.shape[-2:] for f in tt.features] == [f.shape[-2:] for f in st.features]


def test_a_layout_that_cannot_take_a_removal_is_refused(tmp_path):
    one = make_pipeline(tmp_path / "one", layers_per_block=1)
    with pytest.raises(ValueError, match=r"^student.blocks: bk-base removes one of each stage's "
                                         r"layers_per_block blocks; the teacher has layers_per_block 1"):
        sd_config(one, **{"student.blocks": "bk-base"})
    uneven = make_pipeline(tmp_path / "uneven", widths=(8, 16, 32))
    with pytest.raises(ValueError, match=r"^student.blocks: bk-tiny removes the innermost stage, which "
                                         r"keeps the weights only where it is as wide as the stage beside it"):
        sd_config(uneven, **{"student.blocks": "bk-tiny"})
    sd_config(uneven, **{"student.blocks": "bk-small"})  # takes the others


def test_a_text_to_image_u_net_prunes_by_channels_too(sd_pipe):
    from liftplace.teachers import load_teacher

    teacher, _ = load_teacher(sd_pipe)
    same = models.prune_student(teacher, 0.0, example_shape=(2, 4, 8, 8))
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 24, 32)
    with torch.no_grad():
        assert torch.allclose(models.predict(same, x, t, context), models.predict(teacher, x, t, context), atol=1e-5)
    small = models.prune_student(models.remove_blocks(teacher, "bk-small"), 0.5, example_shape=(2, 4, 8, 8))
    assert models.count_params(small) < 0.4 * models.count_params(teacher)
    assert models.predict(small, x, t, context).shape == x.shape
    # a GEGLU feed-forward keeps its hidden units, its value and gate halves paired as the teacher's
    halves = [(name, module) for name, module in small.named_modules() if type(module).__name__ == "GEGLU"]
    assert halves
    for name, geglu in halves:
        out = small.get_submodule(name.replace("net.0", "net.2"))
        assert geglu.proj.out_features == teacher.get_submodule(name).proj.out_features == 2 * out.in_features
        assert geglu.proj.in_features < teacher.get_submodule(name).proj.in_features  # the block's width is pruned


# --- guidance ------------------------------------------------------------------------------

def test_guidance_one_is_unguided_and_zero_is_the_empty_caption(sd_pipe):
    from liftplace.evaluate import generate
    from liftplace.teachers import load_teacher, teacher_process

    teacher, _ = load_teacher(sd_pipe)
    process = teacher_process(sd_pipe, "epsilon")
    captions = text.captions_of(sd_pipe, ["seven", "number one", "a handwritten two"], log=lambda *_: None)
    kwargs = dict(steps=4, seed=3, captions=captions)
    plain = process.sample(lambda x, t, c: models.predict(teacher, x, t, c), (3, 4, 8, 8), steps=4, seed=3,
                           labels=captions.embeddings(torch.arange(3)))
    assert torch.equal(generate(teacher, process, 3, guidance=1.0, **kwargs), plain)
    empty = process.sample(lambda x, t, c: models.predict(teacher, x, t, c), (3, 4, 8, 8), steps=4, seed=3,
                           labels=captions.null.expand(3, -1, -1))
    assert torch.allclose(generate(teacher, process, 3, guidance=0.0, **kwargs), empty, atol=1e-5)
    strong = generate(teacher, process, 3, guidance=4.0, **kwargs)
    assert not torch.allclose(strong, plain, atol=1e-3)


def test_the_stream_drops_captions_to_the_empty_one(sd_pipe):
    from liftplace.distill import Stream
    from liftplace.teachers import teacher_process

    captions = text.captions_of(sd_pipe, ["one", "two", "three", "four"] * 8, log=lambda *_: None)
    x0 = torch.randn(32, 4, 8, 8)
    process = teacher_process(sd_pipe, "epsilon")

    def stream(dropout):
        return Stream(x0, torch.zeros(32, dtype=torch.long), 10, process, 64, torch.device("cpu"),
                      torch.Generator().manual_seed(0), captions=captions, caption_dropout=dropout)

    kept, dropped = stream(0.0).next(), stream(0.5).next()
    assert torch.equal(kept.x_t, dropped.x_t) and torch.equal(kept.target, dropped.target)  # drawn after the noise
    empty = (dropped.labels == captions.null).flatten(1).all(1)
    assert 16 <= int(empty.sum()) <= 48  # about half of 64
    assert torch.equal(dropped.labels[~empty], kept.labels[~empty])
    assert not (kept.labels == captions.null).flatten(1).all(1).any()


# --- a study -------------------------------------------------------------------------------

def test_a_study_on_a_tiny_stable_diffusion_pipeline_runs_to_its_report(ray_session, sd_pipe, tmp_path):
    """ablate_k with bk-small students of a tiny SD pipeline on the built-in captions (Ray
    Tune, cohorts), guided sampling, then its whole report."""
    from liftplace.results import load_study, summarize

    folder, variants = smoke_ablate_k(tmp_path, sd_pipe, "student.blocks=bk-small", "student.prune_ratio=0")
    summary = summarize(load_study(folder))
    assert len(summary) == variants and summary["final_fid"].notna().all()
    rows = load_study(folder)
    final = rows[rows["fid"].notna()]
    assert final["text_alignment"].between(0, 1).all() and (final["eval_guidance_scale"] == 2.0).all()
    report = (folder / "analysis" / "REPORT.md").read_text()
    assert "Not built" not in report
    for figure in ("fid_vs_k.png", "headline.png"):
        assert (folder / "analysis" / figure).is_file()


def smoke_ablate_k(tmp_path, pipe, *settings) -> tuple[Path, int]:
    """ablate_k at smoke on a pipeline and the built-in captions (one seed, 10 steps, guidance
    2), to its report: (its folder, its number of variants)."""
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("study_ablate_k_text", root / "studies" / "ablate_k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    extra = [part for setting in settings for part in ("--set", setting)]
    try:
        folder = module.study_main(module.STUDY, [
            "--preset", "smoke", "--seeds", "1", "--storage", str(tmp_path / "studies"), "--set", f"teacher.name={pipe}",
            "--set", "data.spec=mnist-captions", "--set", "train.steps=10", "--set", "eval.num_images=32",
            "--set", "eval.sampler_steps=2", "--set", "eval.guidance_scale=2", *extra])
    finally:
        sys.modules.pop("study_ablate_k_text", None)
    return folder, len(module.STUDY.variants)


def test_a_step_is_estimated_with_the_whole_captions_context(sd_pipe):
    """The memory estimate attends to the tokenizer's 24 tokens, not to the one-token probe."""
    from liftplace.preflight import step_memory
    from liftplace.teachers import load_teacher

    teacher, _ = load_teacher(sd_pipe)
    assert text.context_length(sd_pipe) == 24
    one = step_memory(teacher, (64, 4, 8, 8))
    whole = step_memory(teacher, (64, 4, 8, 8), context_tokens=24)
    assert whole > one


def test_a_pndm_scheduled_pipeline_trains_on_its_betas_and_taylor_prunes_by_captions(sd_pipe, tmp_path):
    """Stable Diffusion ships PNDM (and other) scheduler configs: the process is their betas'.
    Taylor importance's gradients come from the captions' embeddings."""
    from diffusers import PNDMScheduler

    from liftplace import latents
    from liftplace.teachers import load_teacher, load_vae, teacher_process, teacher_space

    pipe = tmp_path / "pndm"
    shutil.copytree(sd_pipe, pipe)
    PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  skip_prk_steps=True).save_pretrained(str(pipe / "scheduler"))
    process = teacher_process(pipe, "epsilon")
    assert process.clip is None  # PNDM does not clip (DDPM and DDIM do unless clip_sample is false)
    expected = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    assert torch.allclose(process.scheduler.alphas_cumprod, expected)
    config = sd_config(pipe, **{"student.importance": "taylor", "student.prune_ratio": 0.5,
                                "student.blocks": "bk-base"})
    space = teacher_space(pipe)
    split = latents.load_split(config, "train", space, load_vae(space), log=lambda *_: None)
    assert split.captions is not None and split.condition(torch.arange(3)).shape == (3, 24, 32)
    teacher, _ = load_teacher(pipe)
    calibration = models.Calibration.of(split, process)
    student = models.build_student(teacher, config.student, seed=0, example_shape=(2, 4, 8, 8), calibration=calibration)
    empty = text.Captions(split.captions.table, torch.zeros_like(split.captions.index), split.captions.texts)
    other = models.build_student(teacher, config.student, seed=0, example_shape=(2, 4, 8, 8),
                                 calibration=models.Calibration(split.x0, process, split.labels, empty))
    differ = [a for a, b in zip(student.parameters(), other.parameters()) if a.shape != b.shape or not torch.equal(a, b)]
    assert differ  # the captions' gradients keep other channels than the empty caption's


# --- Stable Diffusion 3 --------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3_pipe(tmp_path_factory):
    torch.manual_seed(0)
    return recipes.save_text_pipeline(tmp_path_factory.mktemp("sd3") / "sd3-tiny", models.build_sd3("tiny"), VAE,
                                      max_length=24)


def sd3_config(pipe, **overrides):
    return sd_config(pipe, **{"teacher.prediction": "flow", **overrides})


def test_an_sd3_pipelines_captions_are_its_clip_encoders_states_and_pooled_projections(sd3_pipe):
    """Without a third (T5) encoder, as diffusers allows: the two CLIP encoders' penultimate
    states side by side, zero-padded to the joint width, then 256 zero T5 tokens, then the
    pooled projections packed as one more token."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    captions = text.captions_of(sd3_pipe, ["a handwritten seven", "nine"], log=lambda *_: None)
    packed = captions.embeddings(torch.tensor([0, 1]))
    assert packed.shape == (2, 24 + text.SD3_T5_TOKENS + 1, 64)
    tokenizer = CLIPTokenizer.from_pretrained(str(sd3_pipe / "tokenizer"), local_files_only=True)
    ids = tokenizer(["a handwritten seven", "nine"], padding="max_length", max_length=24, truncation=True,
                    return_tensors="pt").input_ids
    states, pooled = [], []
    for folder in ("text_encoder", "text_encoder_2"):
        encoder = CLIPTextModelWithProjection.from_pretrained(str(sd3_pipe / folder), local_files_only=True).eval()
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    clip = torch.cat(states, -1)
    assert torch.allclose(packed[:, :24, :clip.shape[-1]], clip, atol=1e-5)
    assert not packed[:, :24, clip.shape[-1]:].any() and not packed[:, 24:-1].any()
    assert torch.allclose(packed[:, -1, :40], torch.cat(pooled, -1), atol=1e-5) and not packed[:, -1, 40:].any()
    net = models.build_sd3("tiny")
    context, unpacked = models.unpack_sd3(net, packed)
    assert context.shape == (2, 24 + text.SD3_T5_TOKENS, 64) and torch.equal(unpacked, packed[:, -1, :40])


def test_an_sd3_pipeline_is_a_flow_teacher_and_a_mismatched_one_is_refused(sd3_pipe, tmp_path):
    from liftplace.teachers import teacher_process, teacher_space

    space = teacher_space(sd3_pipe)
    assert space.text == sd3_pipe and space.latent and space.channels == 4
    assert teacher_process(sd3_pipe, "flow").shift == 3.0
    sd3_config(sd3_pipe)
    with pytest.raises(ValueError, match=r"^teacher.prediction: 'epsilon', but the teacher's .* set teacher.prediction=flow"):
        sd_config(sd3_pipe)
    with pytest.raises(ValueError, match=r"^student.blocks: BK-SDM block removal needs a text-to-image U-Net teacher .*"
                                         r"\(its students: student.depth and student.prune_ratio\)"):
        sd3_config(sd3_pipe, **{"student.blocks": "bk-tiny"})
    narrow = edited(sd3_pipe, tmp_path / "narrow", "transformer/config.json", pooled_projection_dim=48)
    with pytest.raises(ValueError, match=r"^teacher.name: teacher .*: its CLIP text encoders project to 40 together, the "
                                         r"transformer's pooled_projection_dim is 48"):
        sd3_config(narrow)
    dual = edited(sd3_pipe, tmp_path / "dual", "transformer/config.json", dual_attention_layers=[0])
    with pytest.raises(ValueError, match=r"^teacher.name: .*dual: an SD3.5 transformer with dual-attention blocks "
                                         r"\(dual_attention_layers \[0\]\) is not supported yet$"):
        sd3_config(dual)


def test_an_sd3_student_keeps_its_teachers_heads_units_and_last_block(sd3_pipe):
    from liftplace.teachers import load_teacher

    teacher, _ = load_teacher(sd3_pipe)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100.0, 700.0])
    context = text.captions_of(sd3_pipe, ["seven", "one"], log=lambda *_: None).embeddings(torch.arange(2))
    same = models.prune_student(teacher, 0.0)
    with torch.no_grad():
        assert torch.equal(models.predict(same, x, t, context), models.predict(teacher, x, t, context))
    student = models.prune_student(teacher, 0.5)
    for mine, theirs in zip(student.transformer_blocks, teacher.transformer_blocks):
        assert mine.attn.heads == 1 and theirs.attn.heads == 2
        head = mine.attn.to_q.out_features
        # the kept head's rows, from every projection at the same position
        kept = [h for h in range(2) if torch.equal(mine.attn.to_q.weight, theirs.attn.to_q.weight[h * head:(h + 1) * head])]
        assert len(kept) == 1
        rows = slice(kept[0] * head, (kept[0] + 1) * head)
        for name in ("to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            assert torch.equal(getattr(mine.attn, name).weight, getattr(theirs.attn, name).weight[rows])
        assert torch.equal(mine.attn.to_out[0].weight, theirs.attn.to_out[0].weight[:, rows])
        units = mine.ff.net[0].proj.out_features
        assert units == theirs.ff.net[0].proj.out_features // 2 and mine.ff.net[2].in_features == units
    assert models.predict(student, x, t, context).shape == x.shape
    alone = models.keep_blocks(teacher, 1)  # the last block, which ends the caption stream: every weight is used
    assert torch.equal(alone.transformer_blocks[0].attn.to_q.weight, teacher.transformer_blocks[2].attn.to_q.weight)
    alone.requires_grad_(True)
    models.predict(alone, x, t, context).square().mean().backward()
    assert all(p.grad is not None for p in alone.parameters())
    shallow = models.keep_blocks(teacher, 2)
    assert torch.equal(shallow.transformer_blocks[1].attn.to_q.weight, teacher.transformer_blocks[2].attn.to_q.weight)
    assert shallow.transformer_blocks[1].context_pre_only and models.predict(shallow, x, t, context).shape == x.shape
    with models.FeatureTaps(teacher) as taps:  # the image tokens, laid on their patch grid
        models.predict(teacher, x, t, context)
        assert [f.shape for f in taps.features] == [(2, 16, 4, 4)] * 3


def test_a_study_on_a_tiny_sd3_pipeline_runs_to_its_report(ray_session, sd3_pipe, tmp_path):
    """ablate_k on a tiny SD3 pipeline (flow, head/MLP-pruned students, guidance 2) to its report."""
    from liftplace.results import load_study, summarize

    folder, variants = smoke_ablate_k(tmp_path, sd3_pipe, "teacher.prediction=flow", "student.prune_ratio=0.5")
    summary = summarize(load_study(folder))
    assert len(summary) == variants and summary["final_fid"].notna().all()
    assert summary["final_text_alignment"].between(0, 1).all()
    report = (folder / "analysis" / "REPORT.md").read_text()
    assert "Not built" not in report and "**Text-to-image.**" in report


def test_the_shipped_text_to_image_teacher_draws_the_digit_its_caption_names():
    """sd-mnist (trained here on mnist-captions, its card measured at guidance 2): sampled for
    "a handwritten <digit>", the digit classifier reads most samples as the digit named."""
    from liftplace import latents
    from liftplace.data import DIGIT_WORDS
    from liftplace.evaluate import generate
    from liftplace.metrics import DEFAULT_EXTRACTOR_WEIGHTS, load_extractor
    from liftplace.teachers import load_teacher, load_vae, teacher_process, teacher_space

    teacher, card = load_teacher("sd-mnist")
    assert card["eval_guidance_scale"] == 2.0 and card["text_alignment"] > 0.9 and card["data"] == "mnist-captions"
    space = teacher_space("sd-mnist")
    digits = [3, 7, 0, 5]
    captions = text.captions_of(space.text, [f"a handwritten {DIGIT_WORDS[d]}" for d in digits for _ in range(4)],
                                log=lambda *_: None)
    latent = generate(teacher, teacher_process("sd-mnist", "epsilon"), 16, steps=20, seed=0, captions=captions,
                      guidance=2.0)
    images = latents.decode(load_vae(space), latent)
    with torch.no_grad():
        read = load_extractor(DEFAULT_EXTRACTOR_WEIGHTS)(images)[1].argmax(1)
    wanted = torch.tensor([d for d in digits for _ in range(4)])
    assert (read == wanted).float().mean() >= 0.75


def tiny_clip(folder: Path) -> Path:
    """A small random CLIPModel with its processor, saved as transformers saves one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = text.build_tokenizer(folder, max_length=24)
    vocab = tokenizer.get_vocab()
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=24,
                                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                         pad_token_id=vocab["<|endoftext|>"]),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


def test_the_clip_score_is_100_times_the_cosine_of_clips_embeddings_floored_at_zero(sd_pipe, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from liftplace.evaluate import evaluate
    from liftplace.metrics import Protocol, clip_score
    from liftplace.teachers import load_teacher, load_vae, teacher_process, teacher_space

    clip = tiny_clip(tmp_path / "clip")
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    captions = ["a handwritten seven", "nine", "the digit 2"]
    model = CLIPModel.from_pretrained(str(clip), local_files_only=True).eval()
    inputs = CLIPProcessor.from_pretrained(str(clip), local_files_only=True)(
        text=captions, images=list(((images + 1) / 2).expand(-1, 3, -1, -1)), return_tensors="pt", padding=True,
        do_rescale=False)
    with torch.no_grad():
        out = model(**inputs)
    image = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    caption = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    expected = (100 * (image * caption).sum(-1)).clamp(min=0).mean()
    assert clip_score(images, captions, clip, batch=2) == pytest.approx(float(expected), abs=1e-4)
    # a run's evaluation adds it beside FID, for its validation captions
    teacher, _ = load_teacher(sd_pipe)
    space = teacher_space(sd_pipe)
    protocol = Protocol(num_images=8, sampler_steps=2, data="mnist-captions", guidance_scale=2.0, clip_weights=str(clip))
    result = evaluate(teacher, teacher_process(sd_pipe, "epsilon"), "mnist-captions", 16, protocol, vae=load_vae(space),
                      text=sd_pipe)
    assert 0 <= result["clip_score"] <= 100 and 0 <= result["text_alignment"] <= 1
    with pytest.raises(ValueError, match=r"^eval.clip_weights: a CLIP score compares samples with their captions; "
                                         r"unet-xs is not a text-to-image teacher"):
        resolve("smoke", {"eval.clip_weights": str(clip)})
    with pytest.raises(FileNotFoundError, match=r"^eval: CLIP weights not found: .*nowhere is not a directory with a "
                                                r"config.json"):
        sd_config(sd_pipe, **{"eval.clip_weights": str(tmp_path / "nowhere")})


def test_a_text_to_image_trials_line_says_its_text_alignment():
    from liftplace.runner.console import _final_fids

    line = _final_fids({"members": {"kd": {"fid": 12.3, "text_alignment": 0.9}, "lift": {"fid": 20.0},
                                    "place": {"fid": float("nan"), "diverged": True, "text_alignment": 0.5}}})
    assert line == "kd FID 12.30 (text 90%) | lift FID 20.00 | place diverged"
