"""The noise process: training pairs and sampling for epsilon-, v- and flow-prediction.

Three parameterizations, each on diffusers schedulers:

- "epsilon" and "v": DDPM with a linear beta schedule (1e-4 .. 0.02 over T = 1000 steps) by
  default, or the schedule a teacher pipeline's scheduler config names (``schedule``), trained
  with integer timesteps, sampled with deterministic DDIM (eta = 0).
- "flow": rectified flow, x_t = (1 - sigma) x0 + sigma noise with target noise - x0 and
  model timestep sigma * T, sampled with the Euler flow-matching scheduler.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

PREDICTIONS = ("epsilon", "v", "flow")

_BETA_START = 1e-4
_BETA_END = 0.02
_DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}
_DEFAULT_SCHEDULE = {"beta_schedule": "linear", "beta_start": _BETA_START, "beta_end": _BETA_END}


# The fields of a diffusers DDPM/DDIM scheduler config that decide the noise levels; a
# schedule given to NoiseProcess may set any of them (the rest keep the defaults above).
SCHEDULE_FIELDS = ("beta_schedule", "beta_start", "beta_end", "trained_betas", "rescale_betas_zero_snr")


def make_process(prediction: str = "epsilon", num_train_timesteps: int = 1000,
                 schedule: dict | None = None, clip: float | None = 1.0, shift: float = 1.0) -> NoiseProcess:
    """The noise process for ``prediction`` (one of ``PREDICTIONS``) over ``num_train_timesteps``;
    ``schedule``: DDPM noise levels (``SCHEDULE_FIELDS``), for epsilon and v only; ``clip``:
    the sampler's bound on its clean estimate (None for latents, which are not in [-1, 1]);
    ``shift``: flow only, the sampler's timestep shift (a FlowMatchEulerDiscreteScheduler's)."""
    return NoiseProcess(prediction, num_train_timesteps, schedule, clip=clip, shift=shift)


class NoiseProcess:
    """Noising, regression targets and sampling for one prediction type.

    Attributes:
        prediction: "epsilon", "v" or "flow".
        num_train_timesteps: T; DDPM timesteps are integers in [0, T), flow timesteps are
            sigma * T with sigma in [0, 1].
        schedule: the DDPM noise levels' settings (``SCHEDULE_FIELDS``); empty for flow.
        clip: sampling clips the clean estimate to [-clip, clip] at each DDIM step and the
            result at the end (a DDIM scheduler's ``clip_sample_range``); None clips nothing
            (latent space).
        shift: flow only: the sampler's sigmas sigma' = shift * sigma / (1 + (shift - 1) * sigma),
            as diffusers' ``FlowMatchEulerDiscreteScheduler`` shifts them (1: none).
        scheduler: the diffusers training scheduler (``DDPMScheduler`` for epsilon and v,
            ``FlowMatchEulerDiscreteScheduler`` for flow); its ``betas`` and
            ``alphas_cumprod`` define the DDPM noise levels.
    """

    def __init__(self, prediction: str = "epsilon", num_train_timesteps: int = 1000, schedule: dict | None = None,
                 *, clip: float | None = 1.0, shift: float = 1.0):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        if not _is_int(num_train_timesteps) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
        schedule = dict(schedule or {})
        if unknown := sorted(set(schedule) - set(SCHEDULE_FIELDS)):
            raise ValueError(f"unknown schedule fields {unknown}; known: {', '.join(SCHEDULE_FIELDS)}")
        if schedule and prediction == "flow":
            raise ValueError("a DDPM schedule does not apply to flow prediction")
        if clip is not None and not (isinstance(clip, numbers.Real) and 0 < clip < math.inf):
            raise ValueError(f"clip must be a positive number or None, got {clip!r}")
        self.prediction = prediction
        self.num_train_timesteps = int(num_train_timesteps)
        self.clip = None if clip is None else float(clip)
        if not (isinstance(shift, numbers.Real) and 0 < shift < math.inf):
            raise ValueError(f"shift must be a positive number, got {shift!r}")
        if shift != 1 and prediction != "flow":
            raise ValueError("a timestep shift applies to flow prediction only")
        self.shift = float(shift)
        self.schedule = {} if prediction == "flow" else {**_DEFAULT_SCHEDULE, **schedule}
        betas = self.schedule.get("trained_betas")
        if betas is not None and len(betas) != self.num_train_timesteps:
            raise ValueError(f"trained_betas has {len(betas)} values for num_train_timesteps {self.num_train_timesteps}")
        if self.schedule.get("rescale_betas_zero_snr") and prediction == "epsilon":
            # alpha_bar reaches 0 at the last step: an epsilon model's x0 estimate divides by it.
            raise ValueError("rescale_betas_zero_snr needs v prediction (with epsilon the last step's x0 is undefined)")
        if prediction == "flow":
            self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift)
        else:
            self.scheduler = DDPMScheduler(**self._ddpm_config())
            betas = self.scheduler.betas
            # diffusers accepts any numbers; a beta outside (0, 1) is no noise process (one
            # outside trained a study to FID 68 without a word).
            if not bool(((betas > 0) & (betas < 1)).all()):
                raise ValueError(f"the noise schedule's betas must lie in (0, 1); these run from {betas.min().item():.4g} "
                                 f"to {betas.max().item():.4g} (beta_start, beta_end or trained_betas)")

    def __repr__(self) -> str:
        return (f"NoiseProcess(prediction={self.prediction!r}, num_train_timesteps={self.num_train_timesteps}"
                + (f", schedule={self.schedule!r}" if self.schedule not in ({}, _DEFAULT_SCHEDULE) else "")
                + (f", clip={self.clip!r}" if self.clip != 1.0 else "")
                + (f", shift={self.shift!r})" if self.shift != 1.0 else ")"))

    def training_pair(
        self, x0: torch.Tensor, generator: torch.Generator | None = None, *, antithetic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise a clean batch at random levels and return what the model must predict.

        Draws the levels first, then the noise, both from ``generator`` (on its device,
        then moved to x0's), so a generator re-seeded alike reproduces a pair.

        Args:
            x0: clean data [B, C, H, W] (or [B, C, T]), in [-1, 1].
            generator: the source of randomness; None uses torch's global one.
            antithetic: draw only the first ceil(B/2) levels; the last B//2 mirror the first
                B//2 (DDPM: t and T-1-t; flow: sigma and 1-sigma), as the authors' DDPM training
                pairs its timesteps. With an odd B the middle sample's level has no mirror.
                False (the default) draws B independent levels, exactly as before the option.

        Returns:
            x_t: noised data, like x0.
            t: the model's timesteps [B]: int64 in [0, T) for DDPM, float32 sigma * T with
                sigma uniform in [0, 1) for flow (antithetic: the mirrors 1 - sigma in (0, 1]).
            target: like x0: the noise (epsilon), ``scheduler.get_velocity`` (v) or
                noise - x0 (flow).
        """
        if x0.ndim < 2:
            raise ValueError(f"x0 must be a batch [B, ...] with at least 2 dims, got shape {tuple(x0.shape)}")
        batch = x0.shape[0]
        draws = (batch + 1) // 2 if antithetic else batch
        draw_device = generator.device if generator is not None else x0.device
        if self.prediction == "flow":
            level = torch.rand(draws, generator=generator, device=draw_device)
        else:
            level = torch.randint(0, self.num_train_timesteps, (draws,), generator=generator, device=draw_device)
        if antithetic:
            first = level[:batch // 2]
            mirror = 1 - first if self.prediction == "flow" else self.num_train_timesteps - 1 - first
            level = torch.cat([level, mirror])
        noise = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=x0.dtype).to(x0.device)
        level = level.to(x0.device)
        if self.prediction == "flow":
            sigma = level.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
            # Built by hand: scheduler.scale_noise only accepts timesteps on its grid.
            return (1 - sigma) * x0 + sigma * noise, level * self.num_train_timesteps, noise - x0
        x_t = self.scheduler.add_noise(x0, noise, level)
        target = noise if self.prediction == "epsilon" else self.scheduler.get_velocity(x0, noise, level)
        return x_t, level, target

    def noise_at(self, x0: torch.Tensor, t: torch.Tensor | int | float, noise: torch.Tensor) -> torch.Tensor:
        """x_t for given model timesteps t (a number or [B]; as ``training_pair`` returns them)."""
        t = torch.as_tensor(t, device=x0.device)
        if t.ndim == 0:
            t = t.expand(x0.shape[0])
        if self.prediction == "flow":
            sigma = (t.to(x0.dtype) / self.num_train_timesteps).view(-1, *([1] * (x0.ndim - 1)))
            return (1 - sigma) * x0 + sigma * noise
        if t.is_floating_point() or t.min() < 0 or t.max() >= self.num_train_timesteps:
            raise ValueError(f"DDPM timesteps must be integers in [0, {self.num_train_timesteps}), got {t.tolist()}")
        return self.scheduler.add_noise(x0, noise, t)

    @torch.no_grad()
    def sample(
        self,
        predict_fn: Callable[..., torch.Tensor],
        shape: Sequence[int],
        *,
        steps: int = 50,
        seed: int = 0,
        device: str | torch.device = "cpu",
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate a batch from pure noise.

        DDPM processes use DDIM with eta = 0 and "leading" spacing: timesteps
        (steps-1)*k, ..., k, 0 with k = T // steps, and a last step to alpha_bar = 1
        (``set_alpha_to_one``), so the result is the model's clean estimate; the x0
        estimate is clipped to [-clip, clip] at each step (not at all when clip is None). This is the DDIM paper's uniform skip;
        with very few steps it starts well below T - 1 (t = 500 for 2 steps). Flow uses
        Euler on sigma = linspace(1, 1/T, steps) (shifted by ``shift``), then to 0.

        Args:
            predict_fn: ``predict_fn(x_t [B, ...], t [B])`` (or ``(x_t, t, labels)`` when
                labels are given) returning the prediction, shaped like x_t; t holds the
                scheduler's timesteps (int64 for DDPM, float32 for flow).
            shape: the batch shape [B, C, H, W] (or [B, C, T]).
            steps: number of model evaluations, in [1, T].
            seed: seeds the initial noise, drawn on the CPU so that a seed gives the same
                images on every device.
            device: where the sampling runs.
            labels: optional class labels [B], passed through to predict_fn.

        Returns:
            float32 samples of ``shape`` on ``device``, clamped to [-clip, clip] (not clamped
            when clip is None).
        """
        if not _is_int(steps) or not 1 <= steps <= self.num_train_timesteps:
            raise ValueError(f"steps must be an int in [1, {self.num_train_timesteps}], got {steps!r}")
        shape = tuple(shape)
        if labels is not None and len(labels) != shape[0]:
            raise ValueError(f"labels has {len(labels)} entries for a batch of {shape[0]}")
        device = torch.device(device)
        extra = () if labels is None else (labels.to(device),)
        # A fresh scheduler per call: schedulers keep step state between calls.
        scheduler = self._sampling_scheduler()
        scheduler.set_timesteps(int(steps), device=device)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(shape, generator=generator).to(device)
        for t in scheduler.timesteps:
            prediction = predict_fn(x, t.repeat(shape[0]), *extra)
            if prediction.shape != x.shape:
                raise ValueError(f"predict_fn returned shape {tuple(prediction.shape)}, expected {shape}")
            # DDIM indexes its tables with the timestep: a Python int works on any device.
            step_t = t if self.prediction == "flow" else int(t)
            x = scheduler.step(prediction, step_t, x).prev_sample
        return x.float() if self.clip is None else x.float().clamp(-self.clip, self.clip)

    def _ddpm_config(self) -> dict:
        return dict(num_train_timesteps=self.num_train_timesteps, **self.schedule,
                    prediction_type=_DIFFUSERS_PREDICTION[self.prediction])

    def _sampling_scheduler(self) -> DDIMScheduler | FlowMatchEulerDiscreteScheduler:
        if self.prediction == "flow":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift)
        # The training scheduler's own betas: every schedule it accepts samples on the same noise
        # levels (DDIM knows fewer beta_schedule names than DDPM: no "sigmoid"), and a zero-SNR
        # rescale is not applied twice.
        return DDIMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            trained_betas=self.scheduler.betas.tolist(),
            prediction_type=_DIFFUSERS_PREDICTION[self.prediction],
            clip_sample=self.clip is not None,
            clip_sample_range=1.0 if self.clip is None else self.clip,
            set_alpha_to_one=True,
            steps_offset=0,
            timestep_spacing="leading",
        )


def _is_int(value) -> bool:
    """True for Python and NumPy integers, False for bools (which are ints to Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
