"""Every figure and table that applies to a study, and a REPORT.md that embeds them.

    python analysis/make_all.py RESULTS_DIR
"""

from __future__ import annotations

import torch

import compression_table
import error_maps
import fid_vs_k
import headline
import linear_correction
import premise
import regime_map
import samples
import stability
import teacher_scale
import weighting_table
from common import cli, fid_by_variant, load, out_dir, protocol_line
from liftplace.results import study_seeds
from liftplace.verdicts import DECIDED

BY_STUDY = {
    "ablate_k": [fid_vs_k],
    "ablate_weighting": [weighting_table],
    "teacher_scale": [teacher_scale],
    "compression": [compression_table],
    "stability": [stability],
}


# These read the trials' final checkpoints (and the first two run the students and the teacher):
# they need the checkpoints, teacher and data where the study ran (on a cluster: the head).
NEEDS_CHECKPOINTS = (linear_correction, error_maps, samples)


def provenance_lines(info: dict) -> list[str]:
    """Who ran the study: each driver's commit, versions and machine, from study.json."""
    history = info.get("history", [])
    if not history:
        why = "`liftplace distill` records none" if info.get("kind") == "run" else "a study written before drivers recorded it"
        return [f"**Provenance.** Not recorded ({why}).", ""]
    lines = ["**Provenance.** " + "; ".join(
        f"{h['action']} {h['at']}: commit {(h['provenance'].get('commit') or 'none')[:10]}"
        + (" (uncommitted changes)" if h["provenance"].get("dirty") else "")
        + ", " + ", ".join(f"{k} {v}" for k, v in h["provenance"].get("versions", {}).items() if k in
                           ("torch", "ray", "diffusers", "torch-pruning", "torch-fidelity"))
        + f", {h['provenance'].get('cpus')} x {h['provenance'].get('cpu')}"
        + (f" (torch kernels {h['provenance']['torch_cpu_capability']})" if h["provenance"].get("torch_cpu_capability") else "")
        + (f", GPUs {', '.join(h['provenance']['gpus'])}" if h["provenance"].get("gpus") else ", no GPU")
        for h in history) + ".", ""]
    return lines


def sequential_lines(info: dict) -> list[str]:
    """A --seeds auto study: its rule, every look and why it stopped."""
    rule, looks = info.get("sequential"), info.get("looks", [])
    if not rule:
        return []
    lines = ["## Seeds: grown until decided", "",
             f"`--seeds auto`: rounds of {rule['round']} seed{'s' if rule['round'] > 1 else ''} until every comparison with kd is decided (better, worse, "
             f"or equivalent within ±{rule['margin']:.0%} of kd's mean) or {rule['max_seeds']} seeds; each look tests "
             f"at the alpha it spends (O'Brien-Fleming-type spending of {rule['alpha']:g} over the information fraction "
             "seeds / the most seeds), so the false-positive rate over all looks stays at or under alpha.", "",
             "| look | seeds | level | decided | undecided |", "|---|---|---|---|---|"]
    for i, look in enumerate(looks, 1):
        decided = ", ".join(f"{v}: {w}" for v, w in look["verdicts"].items() if w in DECIDED)
        undecided = ", ".join(v for v, w in look["verdicts"].items() if w not in DECIDED)
        lines.append(f"| {i} | {look['seeds']} | {look['level']:.2g} | {decided or '-'} | {undecided or '-'} |")
    if looks and looks[-1].get("stop"):
        lines += ["", f"Stopped: {looks[-1]['stop']}."]
    return lines + [""]


def make(folder):
    df, summary, info = load(folder)
    missing = summary.attrs["missing"]
    for earlier in ("headline.txt", "premise.md"):  # an earlier build's, if any
        (out_dir(folder) / earlier).unlink(missing_ok=True)
    if missing:
        print(f"make_all: a partial study: {len(missing)} planned runs did not finish; the report covers the "
              f"{len(summary)} that did")
    # The premise gate first (REPORT.md opens with it), then the headline: kd against the best
    # variant (figure, test, samples), in the words the gate allows.
    scripts = [premise, headline] + BY_STUDY.get(info["name"], []) + [stability, linear_correction, error_maps, samples]
    if len(summary) and len(premise.gate(summary, df)) >= 2:  # settings (ratios, teachers, ...) to place
        scripts.insert(2, regime_map)
    paths, skipped = [], []
    if info.get("preset") == "paper" and not torch.cuda.is_available():
        # 200 images x the sampler's steps through the user's teacher, three times: hours on CPU.
        scripts.remove(linear_correction)
        skipped.append("- `linear_correction` skipped: a `paper` study's teacher on a CPU takes hours; run "
                       f"`python analysis/linear_correction.py {folder}` on a machine with a GPU")
        print(f"make_all: {skipped[-1][2:]}")
    for script in dict.fromkeys(scripts):
        name = script.__name__
        try:
            paths += script.make(folder)
        except FileNotFoundError as err:
            if script not in NEEDS_CHECKPOINTS:
                raise
            print(f"make_all: skipped {name}: {err}")
            skipped.append(f"- `{name}` skipped: {err} (it reads the trials' checkpoints; run it where the "
                           "checkpoints, teacher and data are)")
        except Exception as err:  # noqa: BLE001 -- one figure's failure must not cost the others
            if not missing and len(summary) > 1:  # a whole study: a failing figure is a bug to see
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            print(f"make_all: not built: {name} ({type(err).__name__}: {first})")
            skipped.append(f"- `{name}` not built from these rows: {type(err).__name__}: {first}")
    lines = [f"# {info['name']}", ""]
    gate_text = out_dir(folder) / "premise.md"
    if gate_text.is_file():  # the opening: whether this study tests the paper's claim at all
        lines += [gate_text.read_text().strip(), ""]
        lines += ["## The study", ""]
    lines += [info.get("description", "").strip().split("\n\n")[0], ""]
    if missing:
        lines += [f"**Partial study.** {len(summary)} runs finished; {len(missing)} planned runs did not, and "
                  "nothing below counts them (continue the study with `--resume`):", "",
                  *[f"- {line}" for line in missing], ""]
    seeds = study_seeds(info)
    grown = (f" ({info['seeds']} planned, {len(seeds) - int(info['seeds'])} added in "
             f"{len(info['additions'])} addition{'s' if len(info['additions']) > 1 else ''})") if info.get("additions") else ""
    lines += [f"**Protocol.** {protocol_line(summary if len(summary) else df)}. Preset `{info['preset']}`, {len(seeds)} seeds per variant{grown}, "
             f"runner `{info['runner']}`, {len(summary)} runs ({int(summary['diverged'].sum())} diverged)"
             + (f" in {info['trials']} cohort trials (one teacher forward per step for the runs of a seed)"
                if info.get("cohort") != "off" and info.get("trials", len(summary)) < len(summary) else "")
             + (", each a trial of an Optuna search" if info.get("space") else "") + ".", ""]
    lines += provenance_lines(info) + sequential_lines(info)
    if "vae_params" in summary and summary["vae_params"].notna().any():
        vae = summary[summary["vae_params"].notna()].iloc[0]
        lines += [f"**Latent space.** The teacher and students denoise a frozen VAE's latents; their parameters and "
                  f"MACs count the denoiser only. The VAE ({int(vae['vae_params']):,} parameters) decodes each sample "
                  f"in {vae['vae_decode_macs'] / 1e6:,.1f} M MACs, once per image, before FID.", ""]
    if "eval_guidance_scale" in summary or "final_text_alignment" in summary:
        first = summary.iloc[0]
        blocks = first.get("config/student/blocks")
        ratio = first.get("config/student/prune_ratio")
        pruned = f" with {float(ratio):.0%} of their channels pruned" if isinstance(ratio, (int, float)) and ratio > 0 else ""
        scale = first.get("eval_guidance_scale", 1.0)
        lines += ["**Text-to-image.** The teacher is conditioned on captions through its pipeline's frozen text "
                  f"encoder (the embeddings computed once); {'students are BK-SDM `' + blocks + '` block removals of its U-Net' + pruned if isinstance(blocks, str) else 'students are pruned from its denoiser'}"
                  f", trained with {first.get('config/data/caption_dropout', 0.1):.0%} of captions dropped. Samples for "
                  f"FID are drawn for the validation captions with classifier-free guidance at scale "
                  f"{float(scale) if scale == scale else 1.0:g} (the empty caption unconditional), the same for teacher "
                  "and students"
                  + ("; `text_alignment` is the share of samples the digit classifier reads as the digit their caption "
                     "names" if "final_text_alignment" in summary else "")
                  + ("; `clip_score` is their CLIP score against their captions (mean of max(100 cos, 0), by "
                     f"`{first.get('eval_clip_weights')}`)" if "final_clip_score" in summary else "") + ".", ""]
    headline_text = out_dir(folder) / "headline.txt"
    if headline_text.is_file():
        lines += ["## Result", "", headline_text.read_text().strip(), ""]
    if skipped:
        lines += ["## Not built", "", *skipped, ""]
    table = fid_by_variant(summary).reset_index()
    lines += ["## Final FID by variant", "", table.to_markdown(index=False, floatfmt=".3g"), ""]
    for path in paths:
        if path.suffix == ".txt" or path == gate_text:  # already above
            continue
        if path.suffix == ".png":  # REPORT.md sits beside the figures
            lines += [f"![{path.stem}]({path.name})", ""]
        elif path.suffix == ".md":
            lines += [path.read_text(), ""]
    report = out_dir(folder) / "REPORT.md"
    report.write_text("\n".join(lines))
    return paths + [report]


if __name__ == "__main__":
    cli(make, __doc__.split("\n")[0], list_paths=False)  # the study prints where REPORT.md is
