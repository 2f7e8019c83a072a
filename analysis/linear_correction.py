"""Linear correction of trained students (the paper's Figure 2): how much of a student's error
a fitted line removes, per timestep, and what FID the corrected student samples at.

    python analysis/linear_correction.py RESULTS_DIR [--num-images N] [--all-variants] [--device cpu|cuda]

For each variant's first non-diverged seed, the EMA student of its final checkpoint and the
study's teacher see the same noised validation images x_t at timesteps across [0, T). Per
sample and channel (LIFT's grouping) the teacher's output t is fitted on the student's s by
least squares, t ~ beta0 + beta1 * s. The share of the student's error that the line removes
is 1 - mean((t - beta0 - beta1 s)^2) / mean((t - s)^2). Then kd's student and the best LIFT/PLACE
variant's (every variant with --all-variants) sample twice from the same noise: as trained,
and with the output replaced by the fitted line at every sampler step (an oracle: the line
is fitted to the teacher's output at that step); the table gives both FIDs beside the
teacher's from the same noise and protocol. If the corrected FID is close to the teacher's,
what the student misses is mostly a per-channel offset and scale -- the coarse error LIFT
targets first. FIDs use min(eval.num_images, 200) images unless --num-images says otherwise
(sampling with teacher and student is the slow part); the table states the count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common import kd_and_best_ours, load, out_dir, plt, save_figure, save_table
from liftplace import models
from liftplace.checkpoints import load_student
from liftplace.evaluate import generate
from liftplace.latents import load_split
from liftplace.metrics import compute_metrics
from liftplace.objectives import fit_lines
from liftplace.results import trial_config
from liftplace.teachers import load_vae, teacher_space

NUM_TIMESTEPS = 11  # evenly spaced over [0, T): 0, 100, ..., 900, 999 for T = 1000
PROBE_IMAGES = 256  # validation images per timestep for the error shares
DEFAULT_FID_IMAGES = 200


def line_fit(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The least-squares line of t on s, per sample and channel: (its values at s, beta0, beta1)."""
    flat_s, flat_t = s.flatten(2), t.flatten(2)
    beta0, beta1 = fit_lines(flat_s, flat_t, eps=1e-12)
    return (beta0.unsqueeze(-1) + beta1.unsqueeze(-1) * flat_s).reshape(s.shape), beta0, beta1


def probe_timesteps(process) -> list:
    grid = np.linspace(0, process.num_train_timesteps - 1, NUM_TIMESTEPS).round()
    return [float(t) for t in grid] if process.prediction == "flow" else [int(t) for t in grid]


@torch.no_grad()
def error_shares(student, teacher, process, x0: torch.Tensor, labels=None, *, seed: int = 0) -> pd.DataFrame:
    """Per timestep: the student's MSE to the teacher, after the line, the share removed, betas."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)  # drawn on the CPU: the same on any device
    rows = []
    for t in probe_timesteps(process):
        x_t = process.noise_at(x0, t, noise)
        s = models.predict(student, x_t, t, labels).float()
        tt = models.predict(teacher, x_t, t, labels).float()
        before = (tt - s).square().mean().item()
        fit, beta0, beta1 = line_fit(s, tt)
        after = (tt - fit).square().mean().item()
        rows.append({"timestep": t, "mse": before, "mse_line": after,
                     "share_removed": 1 - after / before if before > 0 else np.nan,
                     "beta0": beta0.mean().item(), "beta1": beta1.mean().item(), "images": len(x0)})
    return pd.DataFrame(rows)


def corrected_predict(student, teacher):
    """A sampler's predict_fn: the student's output moved onto its fitted line to the teacher's."""
    def predict(x, t, *labels):
        s = models.predict(student, x, t, *labels).float()
        return line_fit(s, models.predict(teacher, x, t, *labels).float())[0]
    return predict


def first_seeds(summary: pd.DataFrame) -> pd.DataFrame:
    ok = summary[~summary["diverged"] & summary["final_checkpoint"].notna()]
    return ok.sort_values("seed").drop_duplicates("variant").sort_values("variant")


def measure(folder, *, num_images: int | None = None, all_variants: bool = False, device: str = "cpu", log=print):
    """(per-timestep shares for every variant's first seed, FID table for the chosen ones)."""
    _, summary, _ = load(folder)
    picks = first_seeds(summary)
    if picks.empty:
        raise ValueError(f"no non-diverged trial with a final checkpoint under {folder}")
    sampled = set(picks["variant"]) if all_variants else set(kd_and_best_ours(summary))
    shares, fids, teacher_metrics = [], [], {}
    for _, row in picks.iterrows():
        config = trial_config(folder, row["trial_dir"], row["variant"])
        student, teacher, process = load_student(row["final_checkpoint"], config, device=device)
        protocol = config.eval.protocol(config.data.spec)
        n = min(protocol.num_images, num_images or DEFAULT_FID_IMAGES)
        space = teacher_space(config.teacher.name)  # a latent teacher: probed on latents, sampled images decoded
        val = load_split(config, "val", space, load_vae(space, device))
        images = val.x0
        k = min(PROBE_IMAGES, len(images))
        y = val.condition(torch.arange(k))  # class labels, or captions' embeddings
        y = y.to(device) if y is not None else None
        share = error_shares(student, teacher, process, images[:k].to(device), y, seed=protocol.seed)
        shares.append(share.assign(variant=row["variant"]))
        if row["variant"] not in sampled:
            continue
        real = val.images[:n]

        def fid(**kwargs):
            fake = generate(student, process, n, steps=protocol.sampler_steps, seed=protocol.seed,
                            num_classes=val.num_classes, device=device, captions=val.captions,
                            guidance=protocol.guidance_scale, **kwargs)
            return compute_metrics(val.to_images(fake), real, protocol, real_cache_key=val.name)

        log(f"linear_correction: {row['variant']}: sampling {n} images as trained and corrected")
        plain, fixed = fid(), fid(predict_fn=corrected_predict(student, teacher))
        key = config.teacher.name
        if key not in teacher_metrics:
            fake = generate(teacher, process, n, steps=protocol.sampler_steps, seed=protocol.seed,
                            num_classes=val.num_classes, device=device, captions=val.captions,
                            guidance=protocol.guidance_scale)
            teacher_metrics[key] = compute_metrics(val.to_images(fake), real, protocol, real_cache_key=val.name)
        t_fid = teacher_metrics[key]["fid"]
        gap = plain["fid"] - t_fid
        fids.append({"variant": row["variant"], "seed": int(row["seed"]), "images": n,
                     "student_fid": plain["fid"], "corrected_fid": fixed["fid"], "teacher_fid": t_fid,
                     "gap_closed": (plain["fid"] - fixed["fid"]) / gap if gap > 0 else np.nan,
                     "student_precision": plain["precision"], "corrected_precision": fixed["precision"],
                     "share_removed_mean": share["share_removed"].mean()})
    if not fids:
        raise ValueError(f"none of the variants {sorted(sampled)} has a non-diverged trial with a final checkpoint")
    return pd.concat(shares, ignore_index=True), pd.DataFrame(fids)


def make(folder, *, num_images: int | None = None, all_variants: bool = False, device: str | None = None):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _, summary, info = load(folder)
    shares, fids = measure(folder, num_images=num_images, all_variants=all_variants, device=device)
    shares.to_csv(out_dir(folder) / "linear_correction_shares.csv", index=False)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (variant, group) in enumerate(shares.groupby("variant", sort=True)):
        ax1.plot(group["timestep"], 100 * group["share_removed"], "-o", ms=3, color=f"C{i}", label=variant)
        ax2.plot(group["timestep"], group["mse"], "-", color=f"C{i}", label=f"{variant}: as trained")
        ax2.plot(group["timestep"], group["mse_line"], "--", color=f"C{i}", label=f"{variant}: after the line")
    ax1.set_xlabel("timestep t (0 = clean, T-1 = pure noise)")
    ax1.set_ylabel("student error removed by the fitted line (%)")
    ax1.set_ylim(0, 100)
    ax1.set_title("share of the error that is offset and scale", fontsize=9)
    ax1.legend(fontsize=7)
    ax2.set_yscale("log")
    ax2.set_xlabel("timestep t")
    ax2.set_ylabel("MSE between student and teacher outputs")
    ax2.set_title("error before (solid) and after (dashed) the line", fontsize=9)
    ax2.legend(fontsize=6, ncol=2)
    x = np.arange(len(fids))
    ax3.bar(x - 0.2, fids["student_fid"], 0.4, label="student as trained", color="C7")
    ax3.bar(x + 0.2, fids["corrected_fid"], 0.4, label="student + fitted line", color="C2")
    ax3.scatter(x, fids["teacher_fid"], marker="_", s=900, linewidths=2, color="k", zorder=3,
                label="its teacher, same noise")
    ax3.set_xticks(x, fids["variant"], rotation=30, ha="right", fontsize=7)
    ax3.set_yscale("log")
    ax3.set_ylabel(f"FID ({int(fids['images'].iloc[0])} images, log scale; lower is better)")
    ax3.set_title("sampling with the oracle line at every step", fontsize=9)
    ax3.legend(fontsize=7)
    fig.suptitle(f"{info['name']}: linear correction of trained students (EMA weights, first seed of each variant; "
                 f"line per sample and channel, {int(shares['images'].iloc[0])} validation images per timestep)", fontsize=9)
    first = summary.iloc[0]
    fid_protocol = (f"FID: {first['eval_extractor']} features, {int(fids['images'].iloc[0])} generated vs as many "
                    f"validation images, {int(first['eval_sampler_steps'])} sampler steps, the same noise for "
                    f"student, corrected student and teacher")
    paths = save_figure(fig, folder, "linear_correction", footer=fid_protocol)
    caption = ("FID of students as trained and with the output replaced at every sampler step by the "
               "least-squares line fitted to the teacher's output (per sample and channel); gap_closed = share "
               f"of the student-teacher FID gap the line closes; share_removed_mean = mean over timesteps of the "
               f"share of the output error the line removes. {fid_protocol}.")
    return paths + save_table(fids, folder, "linear_correction", caption, bold={"corrected_fid": "min"})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results_dir", help="a finished study's folder (<storage>/<study>)")
    parser.add_argument("--num-images", type=int, default=None,
                        help=f"images per FID (default: min(eval.num_images, {DEFAULT_FID_IMAGES}))")
    parser.add_argument("--all-variants", action="store_true",
                        help="sample every variant, not only kd and the best other one")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when there is a GPU)")
    args = parser.parse_args(argv)
    try:
        paths = make(args.results_dir, num_images=args.num_images, all_variants=args.all_variants, device=args.device)
    except (ValueError, FileNotFoundError) as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
