"""Tests for liftplace.diffusion: training pairs against diffusers, and sampling."""

import pytest
import torch
from diffusers import DDPMScheduler

from liftplace.diffusion import PREDICTIONS, make_process

SHAPE = (3, 2, 8, 8)


def _x0(seed=0, shape=SHAPE):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _draws(process, seed, x0):
    """Re-draw what training_pair draws from a generator seeded alike: levels, then noise."""
    generator = torch.Generator().manual_seed(seed)
    if process.prediction == "flow":
        levels = torch.rand(x0.shape[0], generator=generator)
    else:
        levels = torch.randint(0, process.num_train_timesteps, (x0.shape[0],), generator=generator)
    return levels, torch.randn(x0.shape, generator=generator)


def test_ddpm_betas_are_linear():
    scheduler = make_process("epsilon").scheduler
    assert len(scheduler.betas) == 1000
    torch.testing.assert_close(scheduler.betas, torch.linspace(1e-4, 0.02, 1000))


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddpm_pair_matches_diffusers(prediction):
    process, x0 = make_process(prediction), _x0()
    x_t, t, target = process.training_pair(x0, torch.Generator().manual_seed(7))
    levels, noise = _draws(process, 7, x0)
    assert t.dtype == torch.int64 and t.shape == (SHAPE[0],) and torch.equal(t, levels)
    reference = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    torch.testing.assert_close(x_t, reference.add_noise(x0, noise, t))
    expected = noise if prediction == "epsilon" else reference.get_velocity(x0, noise, t)
    torch.testing.assert_close(target, expected)


def test_flow_pair_is_the_straight_path():
    process, x0 = make_process("flow"), _x0()
    x_t, t, target = process.training_pair(x0, torch.Generator().manual_seed(7))
    sigma, noise = _draws(process, 7, x0)
    assert t.dtype == torch.float32 and torch.equal(t, sigma * 1000)
    s = sigma.view(-1, 1, 1, 1)
    assert torch.equal(x_t, (1 - s) * x0 + s * noise)
    assert torch.equal(target, noise - x0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("batch", [6, 7, 1])
def test_antithetic_levels_come_in_mirrored_pairs_from_one_generator(prediction, batch):
    """train.antithetic: ceil(B/2) levels drawn, then the noise, from the one generator; the last
    B//2 levels mirror the first B//2 (DDPM: T-1-t, flow: 1-sigma); an odd B's middle one has none."""
    process, x0 = make_process(prediction), _x0(shape=(batch, 2, 4, 4))
    x_t, t, target = process.training_pair(x0, torch.Generator().manual_seed(5), antithetic=True)
    drawn, pairs = (batch + 1) // 2, batch // 2
    generator = torch.Generator().manual_seed(5)
    if prediction == "flow":
        levels = torch.rand(drawn, generator=generator)
        assert t.dtype == torch.float32 and torch.equal(t, torch.cat([levels, 1 - levels[:pairs]]) * 1000)
        torch.testing.assert_close(t[:pairs] + t[drawn:], torch.full((pairs,), 1000.0))
    else:
        levels = torch.randint(0, 1000, (drawn,), generator=generator)
        assert t.dtype == torch.int64 and torch.equal(t, torch.cat([levels, 999 - levels[:pairs]]))
        assert torch.equal(t[:pairs] + t[drawn:], torch.full((pairs,), 999))
    noise = torch.randn(x0.shape, generator=generator)
    assert t.shape == (batch,)
    torch.testing.assert_close(x_t, process.noise_at(x0, t, noise))
    expected = {"epsilon": noise, "flow": noise - x0}.get(prediction)
    if expected is None:
        expected = process.scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(target, expected)
    again = process.training_pair(x0, torch.Generator().manual_seed(5), antithetic=True)
    assert all(torch.equal(a, b) for a, b in zip((x_t, t, target), again))
    # off (the default): B independent levels, as before the option existed
    plain = process.training_pair(x0, torch.Generator().manual_seed(5))
    off = process.training_pair(x0, torch.Generator().manual_seed(5), antithetic=False)
    levels, noise = _draws(process, 5, x0)
    assert torch.equal(plain[1], levels if prediction != "flow" else levels * 1000)
    assert all(torch.equal(a, b) for a, b in zip(plain, off))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_timestep_ranges_and_dtypes(prediction):
    process = make_process(prediction)
    x0 = _x0(shape=(4096, 1, 1, 1)).double()
    x_t, t, target = process.training_pair(x0, torch.Generator().manual_seed(0))
    assert x_t.dtype == target.dtype == torch.float64 and x_t.shape == target.shape == x0.shape
    assert 0 <= t.min() and t.max() < 1000
    # Uniform over the whole range: the extremes come near both ends.
    assert t.min() < 10 and t.max() > 990
    assert t.dtype == (torch.float32 if prediction == "flow" else torch.int64)


def _oracle(process, x0_star):
    """A perfect model for a single target image: the prediction that, at (x_t, t),
    points exactly at x0_star."""
    if process.prediction == "flow":
        return lambda x_t, t: (x_t - x0_star) / (t / 1000).view(-1, 1, 1, 1)
    alphas_cumprod = process.scheduler.alphas_cumprod

    def predict(x_t, t):
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
        epsilon = (x_t - alpha_bar.sqrt() * x0_star) / (1 - alpha_bar).sqrt()
        if process.prediction == "epsilon":
            return epsilon
        return alpha_bar.sqrt() * epsilon - (1 - alpha_bar).sqrt() * x0_star

    return predict


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_oracle_sampling_recovers_the_target(prediction, steps):
    process, x0_star = make_process(prediction), _x0(seed=1) * 0.9
    out = process.sample(_oracle(process, x0_star), SHAPE, steps=steps, seed=3)
    assert out.dtype == torch.float32 and out.shape == SHAPE
    torch.testing.assert_close(out, x0_star, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_same_seed_same_images(prediction):
    process = make_process(prediction)

    def predict(x_t, t):  # some fixed function of both inputs, like a model
        return torch.tanh(x_t) * 0.5 + t.view(-1, 1, 1, 1) / 2000

    first = process.sample(predict, SHAPE, steps=5, seed=11)
    assert torch.equal(first, process.sample(predict, SHAPE, steps=5, seed=11))
    assert not torch.allclose(first, process.sample(predict, SHAPE, steps=5, seed=12))
    assert first.min() >= -1 and first.max() <= 1


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("epsilon", [800, 600, 400, 200, 0]),  # DDIM, "leading" spacing: k = 1000 // 5
        ("flow", [1000.0, 750.25, 500.5, 250.75, 1.0]),  # Euler on sigma = linspace(1, 1/T)
    ],
)
def test_sampling_timesteps_and_labels(prediction, expected):
    process, seen = make_process(prediction), []
    labels = torch.tensor([4, 0, 9])

    def predict(x_t, t, y):
        seen.append(t)
        assert torch.equal(y, labels)
        return torch.zeros_like(x_t)

    process.sample(predict, SHAPE, steps=5, labels=labels)
    assert [step.shape for step in seen] == [(SHAPE[0],)] * 5
    torch.testing.assert_close(torch.stack(seen)[:, 0], torch.tensor(expected, dtype=seen[0].dtype))


def test_bad_arguments_are_refused():
    for bad in ("eps", "v_prediction", "sample", ""):
        with pytest.raises(ValueError, match="prediction.*epsilon"):
            make_process(bad)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        make_process("flow", 0)
    process = make_process("v")
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    for steps in (0, -3, 1001, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            process.sample(zero, SHAPE, steps=steps)
    with pytest.raises(ValueError, match="labels"):
        process.sample(zero, SHAPE, steps=2, labels=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        process.sample(lambda x_t, t: x_t[:1], SHAPE, steps=2)
    assert repr(process) == "NoiseProcess(prediction='v', num_train_timesteps=1000)"


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_noise_at_gives_the_training_pairs_input(prediction):
    process = make_process(prediction)
    x0 = torch.rand(5, 1, 8, 8) * 2 - 1
    x_t, t, _ = process.training_pair(x0, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # replay the pair's draws: the levels, then the noise
    if prediction == "flow":
        torch.rand(5, generator=gen)
    else:
        torch.randint(0, 1000, (5,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    assert torch.allclose(process.noise_at(x0, t, noise), x_t, atol=1e-6)
    if prediction != "flow":
        with pytest.raises(ValueError, match="integers in"):
            process.noise_at(x0, 1000, noise)


def test_sampling_clips_to_the_process_bound_and_latents_are_not_clipped():
    """A latent teacher's scheduler says clip_sample=false: its samples keep their scale."""
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731 - an epsilon model that predicts no noise
    unclipped = make_process("epsilon", clip=None).sample(zero, (64, 1, 4, 4), steps=2, seed=0)
    assert unclipped.abs().max() > 2  # x0 = x_t / sqrt(alpha_bar): noise, at its own scale
    for bound in (1.0, 2.0):
        clipped = make_process("epsilon", clip=bound).sample(zero, (64, 1, 4, 4), steps=2, seed=0)
        assert clipped.abs().max() == bound  # the result clamped at the end
    # ... and the clean estimate at each step, as diffusers' DDIM with clip_sample_range does
    from diffusers import DDIMScheduler

    model = lambda x, t: 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1)  # noqa: E731 - depends on x and t
    ours = make_process("epsilon", clip=2.0).sample(model, (8, 1, 4, 4), steps=4, seed=3)
    ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         clip_sample=True, clip_sample_range=2.0, set_alpha_to_one=True, timestep_spacing="leading")
    ddim.set_timesteps(4)
    x = torch.randn((8, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    for t in ddim.timesteps:
        x = ddim.step(model(x, t.repeat(8)), int(t), x).prev_sample
    torch.testing.assert_close(ours, x.clamp(-2, 2))
    no_step_clip = make_process("epsilon", clip=None).sample(model, (8, 1, 4, 4), steps=4, seed=3)
    assert not torch.allclose(no_step_clip.clamp(-2, 2), ours)  # the per-step clipping changed the path
    with pytest.raises(ValueError, match="clip must be a positive number or None"):
        make_process("epsilon", clip=0)
