"""Error maps (the paper's Figures 3 and 8): where a trained student misses its teacher, at a
few timesteps, and the PLACE groups drawn over that error.

    python analysis/error_maps.py RESULTS_DIR

Students: kd's and the best LIFT/PLACE variant's (first seed, EMA weights, final checkpoint).
One validation image is noised at five timesteps with fixed noise. Per student and timestep
the rows show the model input x_t, the squared error (t - s)^2 between teacher and student
outputs (channel 0), and the PLACE groups of channel 0: its elements ranked by that error and
cut into groups of K (the place variant's K; 16 when the study has none), coloured from the
lowest-error group to the highest. Each group panel says how much of the error one line per
channel (LIFT) removes and how much one line per group (PLACE) removes.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import torch

from common import cli, kd_and_best_ours, load, plt, save_figure
from liftplace import models
from liftplace.checkpoints import load_student
from liftplace.latents import load_split
from liftplace.objectives import PLACE_GROUP_SIZE, error_order, fit_lines, group_elements, group_length
from liftplace.results import trial_config
from liftplace.teachers import load_vae, teacher_space

FRACTIONS = (0.05, 0.25, 0.5, 0.75, 0.95)  # timesteps as fractions of T
DEFAULT_K = PLACE_GROUP_SIZE  # when the study has no place variant


def group_map(s: torch.Tensor, t: torch.Tensor, group_len: int) -> torch.Tensor:
    """[H, W] (or [N]) group index of each element of one channel: rank by error // group_len."""
    flat_s, flat_t = s.reshape(1, -1), t.reshape(1, -1)
    order = error_order(flat_s, flat_t)[0]
    groups = torch.empty_like(order)
    groups[order] = torch.arange(order.numel()) // group_len
    return groups.reshape(s.shape)


def residual_after_lines(s: torch.Tensor, t: torch.Tensor, group_len: int) -> float:
    """Mean squared residual of t after one least-squares line on s per group of group_len
    elements ranked by error (per sample and channel; group_len = H*W is one line per channel)."""
    gs, gt = group_elements(s, t, group_size=group_len)
    beta0, beta1 = fit_lines(gs, gt, eps=1e-12)
    return (gt - beta0.unsqueeze(-1) - beta1.unsqueeze(-1) * gs).square().mean().item()


def variant_k(config) -> int:
    """The place variant's group size (place's default for any other objective), computed by
    place itself from its options; the maps draw groups within channel 0 (H*W elements)."""
    o, r = config.objective, teacher_space(config.teacher.name).size or config.data.resolution
    settings = dataclasses.asdict(o) if o.name == "place" else {}
    # A channel-grouped domain is one channel whatever C is: read the teacher's C only when
    # the whole sample is the domain.
    channels = config_channels(config) if settings.get("group_by") == "sample" else 1
    k = group_length("place", settings, (channels, r, r))
    if (r * r) % k:
        raise ValueError(f"error maps draw groups within one channel of {r * r} elements; K = {k} does not divide it")
    return k


def config_channels(config) -> int:
    return teacher_space(config.teacher.name).channels


def pick_students(summary: pd.DataFrame) -> list:
    """The first seed of kd's student and of the best LIFT/PLACE variant's."""
    ok = summary[~summary["diverged"] & summary["final_checkpoint"].notna()].sort_values("seed")
    return [ok[ok["variant"] == v].iloc[0] for v in kd_and_best_ours(summary)]


@torch.no_grad()
def maps(student, teacher, process, x0, labels, *, seed: int = 0):
    """Per timestep: (t, x_t, student output, teacher output) for one image x0 [1, C, H, W]."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    out = []
    for frac in FRACTIONS:
        t = frac * process.num_train_timesteps if process.prediction == "flow" else int(frac * process.num_train_timesteps)
        x_t = process.noise_at(x0, t, noise)
        out.append((t, x_t, models.predict(student, x_t, t, labels).float(), models.predict(teacher, x_t, t, labels).float()))
    return out


def make(folder):
    _, summary, info = load(folder)
    picks = pick_students(summary)
    if not picks:
        raise ValueError(f"no non-diverged trial with a final checkpoint under {folder}")
    configs = [trial_config(folder, row["trial_dir"], row["variant"]) for row in picks]
    place = [c for c in configs if c.objective.name == "place"]
    k = variant_k(place[0]) if place else DEFAULT_K
    rows = 3 * len(picks)
    fig, axes = plt.subplots(rows, len(FRACTIONS), figsize=(2.3 * len(FRACTIONS), 2.35 * rows), squeeze=False)
    for block, (row, config) in enumerate(zip(picks, configs)):
        student, teacher, process = load_student(row["final_checkpoint"], config)
        space = teacher_space(config.teacher.name)  # a latent teacher's maps are over its latents
        val = load_split(config, "val", space, load_vae(space))
        images, y = val.x0, val.condition(torch.arange(1))  # class labels, or a caption's embedding
        n = images[0, 0].numel()
        for col, (t, x_t, s, tt) in enumerate(maps(student, teacher, process, images[:1], y, seed=config.eval.seed)):
            err = (tt - s)[0, 0].square()
            ax_x, ax_e, ax_g = axes[3 * block, col], axes[3 * block + 1, col], axes[3 * block + 2, col]
            ax_x.imshow(x_t[0, 0], cmap="gray", interpolation="nearest")
            ax_x.set_title(f"t = {t:g}", fontsize=8)
            im = ax_e.imshow(err, cmap="magma", interpolation="nearest")
            fig.colorbar(im, ax=ax_e, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
            ax_g.imshow(group_map(s[0, 0], tt[0, 0], k), cmap="viridis", interpolation="nearest")
            mse = err.mean().item()
            one = residual_after_lines(s[:, :1], tt[:, :1], n)
            per_group = residual_after_lines(s[:, :1], tt[:, :1], k)
            ax_g.set_xlabel(f"removed: 1 line {100 * (1 - one / mse):.0f}%,\n{n // k} lines {100 * (1 - per_group / mse):.0f}%",
                            fontsize=7)
            for ax in (ax_x, ax_e, ax_g):
                ax.set_xticks([])
                ax.set_yticks([])
        label = f"{row['variant']} (seed {int(row['seed'])})"
        axes[3 * block, 0].set_ylabel(f"{label}\ninput x_t", fontsize=8)
        axes[3 * block + 1, 0].set_ylabel(f"{label}\n(teacher - student)^2", fontsize=8)
        axes[3 * block + 2, 0].set_ylabel(f"{label}\nPLACE groups, K={k}\n(dark = low error)", fontsize=8)
    fig.suptitle(f"{info['name']}: teacher-student error of trained students (EMA weights) on one validation image, "
                 f"channel 0; groups of K = {k} elements ranked by error", fontsize=9)
    return save_figure(fig, folder, "error_maps")


if __name__ == "__main__":
    cli(make, __doc__.split("\n")[0])
