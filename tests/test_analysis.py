"""Analysis: statistics against hand computations, results loading, clear errors on bad folders."""

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))

import common  # noqa: E402
import headline  # noqa: E402
import stability  # noqa: E402

from liftplace.results import NotAStudy, load_study, summarize  # noqa: E402


def fixed_summary():
    return pd.DataFrame({
        "variant": ["kd"] * 4 + ["place"] * 4 + ["lift"] * 2,
        "final_fid": [30.0, 34.0, 32.0, 36.0, 20.0, 22.0, 21.0, np.nan, 25.0, 27.0],
        "diverged": [False] * 7 + [True] + [False] * 2,
    })


def exact_mann_whitney_p(a, b):
    """Two-sided exact p by enumerating every way to split the pooled values."""
    pooled = list(a) + list(b)
    u_obs = sum((x > y) + 0.5 * (x == y) for x in a for y in b)
    center = len(a) * len(b) / 2
    count = total = 0
    for idx in itertools.combinations(range(len(pooled)), len(a)):
        aa = [pooled[i] for i in idx]
        bb = [pooled[i] for i in range(len(pooled)) if i not in idx]
        u = sum((x > y) + 0.5 * (x == y) for x in aa for y in bb)
        total += 1
        count += abs(u - center) >= abs(u_obs - center)
    return count / total


def test_statistics_match_hand_computation():
    stats = stability.statistics(fixed_summary()).set_index("method")
    kd, place = stats.loc["kd"], stats.loc["place"]
    assert kd["fid_mean"] == pytest.approx(33.0)
    assert kd["fid_std"] == pytest.approx(np.sqrt(((30 - 33) ** 2 + 1 + 1 + 9) / 3))  # sample std
    assert place["runs"] == 4 and place["diverged"] == 1 and place["fid_mean"] == pytest.approx(21.0)
    assert place["p_vs_kd"] == pytest.approx(exact_mann_whitney_p([20, 22, 21], [30, 34, 32, 36]))
    assert np.isnan(kd["p_vs_kd"])
    # the bootstrap interval of the mean lies inside the data's range and around the mean
    assert 30 <= kd["ci95_low"] < 33 < kd["ci95_high"] <= 36


def test_holm_adjusts_by_rank_and_keeps_order():
    # Hand-computed: sorted p 0.01, 0.02, 0.04 times 3, 2, 1 = 0.03, 0.04, 0.04 (made monotone).
    assert headline.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    adjusted = headline.holm([0.5, float("nan"), 0.001])
    assert adjusted[0] == pytest.approx(0.5) and np.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.002)


def test_versus_kd_gives_welch_interval_and_an_honest_verdict():
    table = headline.versus(fixed_summary()).set_index("variant")
    place = table.loc["place"]  # 20, 22, 21 (the diverged run is left out) against 30, 32, 34, 36
    assert place["seeds"] == 3 and place["kd_seeds"] == 4
    assert place["difference"] == pytest.approx(21.0 - 33.0)
    # Welch by hand: standard error and Welch-Satterthwaite degrees of freedom.
    va, vb = np.var([20, 22, 21], ddof=1) / 3, np.var([30, 32, 34, 36], ddof=1) / 4
    se, df = np.sqrt(va + vb), (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    from scipy.stats import t
    assert place["ci95_high"] == pytest.approx(-12.0 + t.ppf(0.975, df) * se)
    assert place["p"] == pytest.approx(2 * t.sf(12.0 / se, df))
    assert place["verdict"].startswith("better than kd")
    assert table.loc["lift", "verdict"].startswith("too few seeds")  # two seeds only
    assert headline.best_variant(fixed_summary()) == "place"


def test_variants_of_another_teacher_are_compared_with_the_kd_run_of_their_own_teacher():
    """teacher_scale and compression vary more than the objective: "place unet-l" is compared
    with "kd unet-l", and the teacher line is the best variant's teacher."""
    rows = []
    for teacher, kd_fids, place_fids, teacher_fid in (("unet-m", [10, 11, 12], [20, 21, 22], 3.0),
                                                      ("unet-l", [30, 31, 32], [5, 6, 7], 1.5)):
        for method, fids in (("kd", kd_fids), ("place", place_fids)):
            for seed, fid in enumerate(fids):
                rows.append({"variant": f"{method} {teacher}", "final_fid": float(fid), "diverged": False,
                             "config/objective/name": method, "config/teacher/name": teacher,
                             "config/train/seed": seed, "teacher_fid": teacher_fid})
    summary = pd.DataFrame(rows)
    assert headline.references(summary) == {"place unet-m": "kd unet-m", "place unet-l": "kd unet-l"}
    table = headline.versus(summary).set_index("variant")
    assert table.loc["place unet-l", "difference"] == pytest.approx(6.0 - 31.0)
    assert table.loc["place unet-m", "difference"] == pytest.approx(21.0 - 11.0)
    assert table.loc["place unet-l", "verdict"].startswith("better than kd unet-l")
    assert table.loc["place unet-m", "verdict"].startswith("worse than kd unet-m")
    assert headline.best_variant(summary) == "place unet-l" and headline.teacher_fid(summary, "place unet-l") == 1.5
    text = headline.sentence(summary, headline.versus(summary))
    assert "against kd unet-l 31.00" in text and "teacher 1.50" in text
    # One kd for every variant where only the objective differs (ablate_k), and without config
    # columns the variant named kd.
    flat = summary[summary["config/teacher/name"] == "unet-m"].replace({"kd unet-m": "kd", "place unet-m": "place"})
    assert headline.references(flat) == {"place": "kd"}
    assert headline.references(fixed_summary()) == {"place": "kd", "lift": "kd"}


def test_the_headline_is_the_best_lift_place_variant_even_where_a_baseline_beats_it():
    """compression also trains task, feat and kd+feat: a baseline better than every LIFT/PLACE
    variant (task 50% here) is not this method's headline."""
    rows = []
    for method, fids in (("kd", [3.6, 3.8, 3.7]), ("task", [4.0, 4.1, 4.0]), ("place", [10.0, 12.0, 11.0]),
                         ("lift", [25.0, 26.0, 27.0])):
        for seed, fid in enumerate(fids):
            rows.append({"variant": f"{method} 50%", "final_fid": fid, "diverged": False,
                         "config/objective/name": method, "config/student/prune_ratio": 0.5,
                         "config/train/seed": seed, "teacher_fid": 3.0})
    summary = pd.DataFrame(rows)
    assert headline.best_variant(summary) == "place 50%"
    assert headline.sentence(summary, headline.versus(summary)).startswith("Best LIFT/PLACE variant: **place 50%**")
    # The Figure-2 probe and the error maps take kd's student and the same one.
    loadable = summary.assign(final_checkpoint="ckpt", seed=summary["config/train/seed"])
    assert common.kd_and_best_ours(loadable) == ["kd 50%", "place 50%"]
    assert [row["variant"] for row in error_maps.pick_students(loadable)] == ["kd 50%", "place 50%"]
    # Without LIFT/PLACE variants the best other variant leads, named for what it is.
    baselines = summary[summary["config/objective/name"].isin(["kd", "task"])]
    assert headline.best_variant(baselines) == "task 50%"
    assert headline.sentence(baselines, headline.versus(baselines)).startswith("Best variant other than kd: **task 50%**")


def test_bootstrap_interval_is_deterministic_and_degenerate_for_one_value():
    assert stability.bootstrap_ci([1.0, 2.0, 3.0]) == stability.bootstrap_ci([1.0, 2.0, 3.0])
    assert all(np.isnan(stability.bootstrap_ci([5.0])))


def write_trial(folder, name, rows, config):
    trial = folder / name
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps({"run": {"variant": name, "seed": 0, "config": config}}))
    (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_load_study_flattens_config_and_keeps_one_row_per_step(tmp_path):
    (tmp_path / "study.json").write_text(json.dumps({"name": "hand"}))
    config = {"objective": {"name": "kd"}, "train": {"seed": 0}}
    rows = [{"step": 5, "loss": 1.0, "fid": None, "diverged": False}, {"step": 10, "loss": 0.9, "diverged": False},
            {"step": 10, "loss": 0.8, "fid": 42.0, "diverged": False}]  # step 10 re-reported after a resume
    write_trial(tmp_path, "kd", rows, config)
    df = load_study(tmp_path)
    assert list(df["step"]) == [5, 10] and df["loss"].iloc[-1] == 0.8
    assert (df["config/objective/name"] == "kd").all() and df["study"].iloc[0] == "hand"
    summary = summarize(df)
    assert summary["final_fid"].iloc[0] == 42.0 and summary["steps"].iloc[0] == 10


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(NotAStudy, match="is not a directory"):
        load_study(tmp_path / "missing")
    with pytest.raises(NotAStudy, match="no study.json"):
        load_study(tmp_path)
    (tmp_path / "study.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(NotAStudy, match="no trial folders"):
        load_study(tmp_path)
    write_trial(tmp_path, "t1", [], {"objective": {"name": "kd"}})
    with pytest.raises(NotAStudy, match="t1 has no reported rows.*--resume"):
        load_study(tmp_path)
    (tmp_path / "t1" / "result.json").write_text('{"step": 1}\n{broken\n{"step": 3}\n')
    with pytest.raises(NotAStudy, match="line 2 is not JSON"):
        load_study(tmp_path)
    (tmp_path / "t1" / "result.json").write_text('{"step": 1, "diverged": false}\n{"step": 2, "los')  # cut short by a crash
    assert list(load_study(tmp_path)["step"]) == [1]


def test_analysis_cli_prints_one_line_on_a_bad_folder(tmp_path):
    import subprocess

    script = Path(__file__).resolve().parents[1] / "analysis" / "make_all.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no study.json" in proc.stderr


def test_a_restored_trials_second_folder_joins_the_first(tmp_path):
    # Ray gives a restored trial a new folder "<old>_<4 hex>" when the old one exists.
    (tmp_path / "study.json").write_text(json.dumps({"name": "twins"}))
    config = {"objective": {"name": "kd"}, "train": {"seed": 0}}
    write_trial(tmp_path, "kd-seed0-abc_00001", [{"step": 5, "diverged": False}], config)
    write_trial(tmp_path, "kd-seed0-abc_00001_7ca7", [{"step": 10, "fid": 3.0, "diverged": False}], config)
    write_trial(tmp_path, "place-seed0-abc_00002", [], config)  # started, then the driver died ...
    write_trial(tmp_path, "place-seed0-abc_00002_1f2e", [{"step": 5, "diverged": False}, {"step": 10, "fid": 2.0,
                                                          "diverged": False}], config)  # ... and it ran here
    summary = summarize(load_study(tmp_path))
    assert len(summary) == 2 and list(summary["steps"]) == [10, 10]
    assert sorted(summary["final_fid"]) == [2.0, 3.0]


# --- linear correction and error maps: the mathematics, on real models --------------------------

import copy  # noqa: E402

import torch  # noqa: E402

import error_maps  # noqa: E402
import linear_correction  # noqa: E402


def affine_student(teacher, scale=2.0, shift=0.3):
    """A 'student' whose output is exactly scale * teacher + shift: its last conv, rescaled."""
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.conv_out.weight.mul_(scale)
        student.conv_out.bias.mul_(scale).add_(shift)
    return student


def test_the_fitted_line_removes_an_affine_students_whole_error(tiny_teacher_dir):
    from liftplace.diffusion import make_process
    from liftplace.evaluate import generate
    from liftplace.teachers import load_teacher

    teacher, _ = load_teacher(tiny_teacher_dir)
    teacher.eval()
    student = affine_student(teacher)
    process = make_process("epsilon")
    x0 = torch.rand(6, 1, 16, 16) * 2 - 1
    shares = linear_correction.error_shares(student, teacher, process, x0, seed=1)
    assert list(shares["timestep"]) == [0, 100, 200, 300, 400, 500, 599, 699, 799, 899, 999]
    assert (shares["mse"] > 0.01).all()
    assert (shares["share_removed"] > 1 - 1e-6).all()
    assert shares["beta1"].to_numpy() == pytest.approx(0.5, rel=1e-4)
    assert shares["beta0"].to_numpy() == pytest.approx(-0.15, abs=1e-4)
    # sampling with the corrected student is sampling with the teacher
    corrected = generate(student, process, 4, steps=3, seed=0,
                         predict_fn=linear_correction.corrected_predict(student, teacher))
    assert torch.allclose(corrected, generate(teacher, process, 4, steps=3, seed=0), atol=1e-4)
    assert not torch.allclose(generate(student, process, 4, steps=3, seed=0), corrected, atol=1e-2)


def test_line_fit_is_least_squares_per_sample_and_channel():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    fit = linear_correction.line_fit(s, t)[0]
    for b in range(3):
        for c in range(2):
            design = torch.stack([torch.ones(16), s[b, c].flatten()], 1).double()
            coef = torch.linalg.lstsq(design, t[b, c].flatten().double().unsqueeze(1)).solution
            assert torch.allclose(fit[b, c].flatten().double(), (design @ coef).squeeze(1), atol=1e-5)


def test_place_groups_rank_elements_by_error():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)
    groups = error_maps.group_map(s, t, 16)
    err = (t - s).square()
    assert sorted(torch.bincount(groups.flatten()).tolist()) == [16, 16, 16, 16]
    for g in range(3):  # every element of a group has no more error than any element of the next
        assert err[groups == g].max() <= err[groups == g + 1].min()


def test_lines_per_group_never_leave_more_error_than_one_line():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(2, 1, 8, 8, generator=gen)
    t = torch.sin(3 * s) + 0.1 * torch.randn(2, 1, 8, 8, generator=gen)
    one = error_maps.residual_after_lines(s, t, 64)
    fit = linear_correction.line_fit(s, t)[0]
    assert one == pytest.approx((t - fit).square().mean().item(), rel=1e-5)  # one group = LIFT's line
    residuals = [error_maps.residual_after_lines(s, t, k) for k in (32, 16, 4)]
    assert all(r <= one + 1e-7 for r in residuals) and residuals[-1] < 0.5 * one


def test_a_search_trials_config_holds_the_values_optuna_chose(tmp_path):
    from liftplace.results import trial_config

    config = {"objective": {"name": "place", "group_size": None}, "train": {"lr": 1e-3, "seed": 0}}
    write_trial(tmp_path, "t", [{"step": 1}], config)
    params = json.loads((tmp_path / "t" / "params.json").read_text())
    params["search"] = {"objective.group_size": 64, "train.lr": 3e-4}
    (tmp_path / "t" / "params.json").write_text(json.dumps(params))
    got = trial_config(tmp_path, "t")
    assert (got.objective.name, got.objective.group_size) == ("place", 64)
    assert (got.train.lr, got.train.seed) == (3e-4, 0)


def test_error_maps_use_the_place_variants_group_size():
    from liftplace.config import resolve

    k = error_maps.variant_k
    assert k(resolve("cpu", ["objective.name=place"])) == 16  # place's default
    assert k(resolve("cpu", ["objective.name=place", "objective.group_size=64"])) == 64
    assert k(resolve("cpu", ["objective.name=place", "objective.num_groups=8"])) == 32  # 16x16 / 8
    assert k(resolve("cpu", ["objective.name=kd"])) == 16


def test_make_all_reports_a_partial_study_and_lists_what_is_missing(tmp_path):
    """Two variants x two seeds planned: kd seed 0 and place seed 0 finished, kd seed 1 stopped at
    step 5 of 10 (interrupted), place seed 1 never started. The report covers the two finished
    runs (one seed each), lists the other two, and no figure fails the build."""
    import subprocess

    study = tmp_path / "ablate_k"
    variants = {"kd": {"objective.name": "kd"}, "place K=16": {"objective.name": "place"}}
    (study).mkdir()
    (study / "study.json").write_text(json.dumps({
        "name": "ablate_k", "description": "A hand-made partial study.", "preset": "smoke", "seeds": 2,
        "variants": variants, "runner": "direct", "trials": 4, "space": {}}))
    # As a trial writes them: every row has the evaluation columns (NaN between evaluations).
    protocol = {"eval_extractor": "digits-cnn", "eval_num_images": 64, "eval_sampler_steps": 5, "teacher_fid": 3.0,
                "fid": None, "precision": None, "recall": None}

    def trial(name, variant, seed, rows):
        folder = study / name
        folder.mkdir()
        from liftplace.config import resolve

        config = resolve("smoke", {**variants[variant], "train.seed": seed, "train.steps": 10}, check_paths=False).to_dict()
        (folder / "params.json").write_text(json.dumps({"run": {"variant": variant, "seed": seed, "config": config}}))
        (folder / "result.json").write_text("".join(json.dumps({**protocol, "diverged": False, **r}) + "\n" for r in rows))

    trial("kd-seed0", "kd", 0, [{"step": 5, "loss": 1.0}, {"step": 10, "loss": 0.5, "fid": 30.0, "precision": 0.5, "recall": 0.4}])
    trial("place-seed0", "place K=16", 0, [{"step": 5, "loss": 1.0}, {"step": 10, "loss": 0.4, "fid": 20.0, "precision": 0.6, "recall": 0.5}])
    trial("kd-seed1", "kd", 1, [{"step": 5, "loss": 1.1}])
    script = Path(__file__).resolve().parents[1] / "analysis" / "make_all.py"
    proc = subprocess.run([sys.executable, str(script), str(study)], capture_output=True, text=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "a partial study: 2 planned runs did not finish" in proc.stdout
    report = (study / "analysis" / "REPORT.md").read_text()
    assert "**Partial study.** 2 runs finished" in report
    assert "- kd seed 1: stopped at step 5 of 10" in report
    assert "- place K=16 seed 1: no rows (never started)" in report
    table = report.split("## Final FID by variant")[1]
    kd_row = next(line for line in table.splitlines() if line.startswith("| kd"))
    assert "30" in kd_row and "| 1 " in kd_row.replace("|       1 ", "| 1 ")  # one finished seed, FID 30
    assert "too few seeds" in report  # one seed each: no verdict
    assert "No variant is called better, worse or equivalent to kd: every one has fewer than 3 seeds a side." in report
    for figure in ("headline.png", "stability.png", "fid_vs_k.png"):
        assert (study / "analysis" / figure).is_file(), figure


# --- the premise gate: does a study's own numbers put it where the paper's claim applies? -------

import premise  # noqa: E402

PAPER_CLAIM = "tests the paper's claim"


def premise_runs(task, kd, teacher=2.0, place=None, setting=None, curve=(1.05, 1.0)):
    """(summary, evaluation rows) of one setting by hand: each variant's final FIDs, one per seed;
    every run evaluated at steps 500, 1000, ... with FID = final x the curve's factors."""
    rows, evals = [], []
    for method, fids in (("task", task), ("kd", kd), ("place", place)):
        for seed, fid in enumerate(fids or []):
            variant = method if setting is None else f"{method} {setting}"
            run = f"{variant}/seed{seed}"
            row = {"variant": variant, "run": run, "final_fid": float(fid), "diverged": False, "teacher_fid": teacher,
                   "config/objective/name": method, "config/train/seed": seed}
            if setting is not None:
                row["config/student/prune_ratio"] = setting
            rows.append(row)
            evals += [{"run": run, "variant": variant, "step": 500 * (i + 1), "fid": fid * factor}
                      for i, factor in enumerate(curve)]
    return pd.DataFrame(rows), pd.DataFrame(evals)


def premise_text(summary, evals):
    """(gate table, its Markdown section, the headline sentence that follows it)."""
    table = premise.gate(summary, evals)
    sentence = headline.sentence(summary, headline.versus(summary), gate=table)
    return table, premise.markdown(table, summary), sentence


KD = [10.0, 11.0, 12.0]


def test_the_premise_gate_passes_where_the_student_needs_kd_kd_is_far_from_the_teacher_and_fid_converged():
    summary, evals = premise_runs([40.0, 44.0, 48.0], KD, teacher=2.0, place=[9.0, 10.0, 11.0])
    table, section, sentence = premise_text(summary, evals)
    row = table.iloc[0]
    assert len(table) == 1 and (row["task"], row["kd"], row["checked"]) == ("task", "kd", "place")
    assert row["task_kd"] == pytest.approx(4.0) and row["task_kd_ok"] and row["kd_teacher_ok"]
    assert row["convergence"] == "converged" and row["kd_change"] == pytest.approx(1 / 1.05 - 1) and row["passes"]
    assert section.startswith("## Premise") and "| **passes** |" in section
    assert "4.00x (95% CI" in section and "paper 4.0x" in section and "paper 8.5x" in section
    assert "The premise gate passes (task 4.00x kd, kd 5.48x the teacher, converged): this study tests the paper's claim." in sentence
    assert sentence.startswith("Best LIFT/PLACE variant: **place**")  # the result first, its framing after


@pytest.mark.parametrize("case,arguments,failed,question", [
    ("task < 3x kd", {"task": [20.0, 22.0, 24.0]}, "task_kd_ok", "the student learns alone nearly as well as with kd"),
    ("kd < 5x teacher", {"teacher": 4.0}, "kd_teacher_ok", "kd already nearly matches the teacher"),
    ("not converged", {"curve": (1.5, 1.0)}, "converged_ok", "at a fixed budget, before convergence"),
    ("one evaluation", {"curve": (1.0,)}, "converged_ok", "set train.eval_every so that a run evaluates at least twice"),
])
def test_each_failing_condition_alone_fails_the_gate_and_the_headline_says_what_is_asked_instead(case, arguments,
                                                                                                   failed, question):
    passing = {"task": [40.0, 44.0, 48.0], "kd": KD, "teacher": 2.0, "place": [9.0, 10.0, 11.0]}
    table, section, sentence = premise_text(*premise_runs(**{**passing, **arguments}))
    row = table.iloc[0]
    assert not row["passes"] and not row[failed]
    assert all(row[ok] for ok in ("task_kd_ok", "kd_teacher_ok", "converged_ok") if ok != failed)  # alone
    assert "| fails " in section and question in section and question in sentence
    assert "The premise gate fails (" in sentence and "this study does not test the paper's claim" in sentence
    assert PAPER_CLAIM not in sentence and PAPER_CLAIM not in section and "paper's regime" not in sentence
    expected = {"task < 3x kd": "task only 2.00x kd, under 3x", "kd < 5x teacher": "kd only 2.74x the teacher, under 5x",
                "not converged": "not converged: FID moved kd -33%, place -33%",
                "one evaluation": "convergence not measured: 1 evaluation per run"}[case]
    assert expected in sentence
    if case == "one evaluation":
        assert row["convergence"] == "not measured" and row["evaluations"] == 1


def test_a_study_without_a_task_variant_says_its_premise_was_not_measured():
    summary, evals = premise_runs(None, KD, place=[9.0, 10.0, 11.0])
    table, section, sentence = premise_text(summary, evals)
    assert table.empty
    assert "The premise was not measured (no task variant)" in section
    assert "The premise was not measured (no task variant)" in sentence and PAPER_CLAIM not in sentence
    # Without evaluation rows (a summary alone) the sentence still frames the result.
    assert "premise was not measured (no task variant)" in headline.sentence(summary, headline.versus(summary))


def test_the_gate_is_computed_per_setting_each_task_against_the_kd_of_its_own_setting():
    """compression / regime: 90% needs kd and passes; 50%'s student learns alone (task ~ kd) and
    fails. The headline's best variant is place 50%, in the failing setting: the sentence says so."""
    high, high_evals = premise_runs([40.0, 44.0, 48.0], KD, teacher=2.0, place=[9.0, 10.0, 11.0], setting="90%")
    low, low_evals = premise_runs([6.0, 6.5, 7.0], [5.5, 6.0, 6.5], teacher=2.0, place=[5.0, 5.2, 5.4], setting="50%")
    summary, evals = pd.concat([low, high], ignore_index=True), pd.concat([low_evals, high_evals], ignore_index=True)
    table, section, sentence = premise_text(summary, evals)
    assert list(table["setting"]) == ["50%", "90%"] and list(table["kd"]) == ["kd 50%", "kd 90%"]
    assert list(table["passes"]) == [False, True] and table.iloc[0]["checked"] == "place 50%"
    assert table.iloc[1]["task_kd"] == pytest.approx(4.0)  # 90%'s task against 90%'s kd, not 50%'s
    assert "The premise gate passes in 90% only: there the numbers test the paper's claim. It fails in 50% (task only" in section
    assert ("The headline comparison (place 50% against kd 50%) is in 50%, which fails: the student learns alone "
            "nearly as well as with kd") in sentence
    assert "this study tests the paper's claim" not in sentence and "paper's regime" not in sentence


def test_the_premise_intervals_match_a_hand_computation():
    task, kd, teacher = [30.0, 45.0, 38.0, 52.0], [10.0, 12.5, 11.0], 2.5
    summary, evals = premise_runs(task, kd, teacher=teacher)
    row = premise.gate(summary, evals).iloc[0]
    from scipy.stats import t

    lt, lk = np.log(task), np.log(kd)
    va, vb = lt.var(ddof=1) / 4, lk.var(ddof=1) / 3
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)  # Welch-Satterthwaite
    diff, half = lt.mean() - lk.mean(), t.ppf(0.975, df) * np.sqrt(va + vb)
    geomean = lambda x: np.prod(x) ** (1 / len(x))  # noqa: E731
    assert row["task_kd"] == pytest.approx(geomean(task) / geomean(kd))
    assert (row["task_kd_low"], row["task_kd_high"]) == pytest.approx((np.exp(diff - half), np.exp(diff + half)))
    half_kd = t.ppf(0.975, 2) * lk.std(ddof=1) / np.sqrt(3)
    assert row["kd_teacher"] == pytest.approx(geomean(kd) / teacher)
    assert (row["kd_teacher_low"], row["kd_teacher_high"]) == pytest.approx(
        (np.exp(lk.mean() - half_kd) / teacher, np.exp(lk.mean() + half_kd) / teacher))
    # With one seed a side: the point, and no interval.
    one = premise.gate(*premise_runs([40.0], [10.0], teacher=teacher)).iloc[0]
    assert one["task_kd"] == pytest.approx(4.0) and np.isnan(one["task_kd_low"]) and np.isnan(one["kd_teacher_high"])


def test_the_headline_never_says_a_study_tests_the_paper_s_claim_unless_its_gate_passes():
    passes = []
    # Each condition on both sides of its edge (kd's geometric mean is 10.97: 5x a teacher of 2.19;
    # the curves move -17% and -9%), in every combination.
    for task_times, teacher, curve in itertools.product((2.9, 3.1), (2.1, 2.3), ((1.0,), (1.2, 1.0), (1.1, 1.0))):
        summary, evals = premise_runs([f * task_times for f in KD], KD, teacher=teacher, place=[9.0, 10.0, 11.0],
                                      curve=curve)
        table, _, sentence = premise_text(summary, evals)
        assert (PAPER_CLAIM in sentence) == bool(table.iloc[0]["passes"]), (task_times, teacher, curve, sentence)
        assert "paper's regime" not in sentence
        passes.append(bool(table.iloc[0]["passes"]))
    assert passes.count(True) == 1  # task 3.1x, teacher 2.1, converged: the one that passes


def test_make_all_opens_the_report_with_the_gate_and_maps_the_settings(tmp_path, monkeypatch):
    """A hand-made finished study of two pruning ratios x task / kd / place x 3 seeds, FID at
    steps 5 and 10: REPORT.md opens with the gate, the headline follows it, and the regime map and
    its table are built (the checkpoint readers have nothing to read here)."""
    from liftplace.config import resolve

    study = tmp_path / "regime"
    study.mkdir()
    finals = {0.5: {"task": 6.0, "kd": 5.5, "place": 5.0}, 0.9: {"task": 44.0, "kd": 11.0, "place": 10.0}}
    variants = {f"{m} {int(r * 100)}%": {"objective.name": m, "student.prune_ratio": r} for r in finals for m in finals[r]}
    (study / "study.json").write_text(json.dumps({"name": "regime", "description": "A hand-made study.", "preset": "smoke",
                                                  "seeds": 3, "variants": variants, "runner": "direct", "space": {}}))
    protocol = {"eval_extractor": "digits-cnn", "eval_num_images": 64, "eval_sampler_steps": 5, "teacher_fid": 2.0,
                "precision": None, "recall": None, "diverged": False}
    for variant, options in variants.items():
        for seed in range(3):
            config = resolve("smoke", {**options, "train.seed": seed, "train.steps": 10}, check_paths=False).to_dict()
            fid = finals[options["student.prune_ratio"]][options["objective.name"]] * (1 + 0.05 * (seed - 1))
            folder = study / f"{variant.replace(' ', '-').replace('%', '')}-seed{seed}"
            folder.mkdir()
            (folder / "params.json").write_text(json.dumps({"run": {"variant": variant, "seed": seed, "config": config}}))
            (folder / "result.json").write_text("".join(json.dumps({**protocol, **r}) + "\n" for r in (
                {"step": 5, "fid": fid * 1.05}, {"step": 10, "fid": fid, "loss": 0.5})))
    import make_all

    def no_checkpoints(folder):
        raise FileNotFoundError("no checkpoints in a hand-made study")

    for module in (linear_correction, error_maps, make_all.samples):
        monkeypatch.setattr(module, "make", no_checkpoints)
    make_all.make(study)
    out = study / "analysis"
    report = (out / "REPORT.md").read_text()
    assert report.startswith("# regime\n\n## Premise: does this study test the paper's claim?")
    assert report.index("## Premise") < report.index("## The study") < report.index("## Result")
    assert report.count("## Premise") == 1  # opened with, not embedded again among the tables
    assert "The premise gate passes in 90% only" in report and "| 50%       | 1.09x" in report
    result = report.split("## Result")[1].split("##")[0]
    assert "The headline comparison (place 50% against kd 50%) is in 50%, which fails" in result
    for name in ("regime_map.png", "regime_map.pdf", "regime_map.md", "regime_map.tex"):
        assert (out / name).is_file(), name
    assert r"50\%" in (out / "regime_map.tex").read_text()  # LaTeX reads a bare % as a comment
    assert "![regime_map](regime_map.png)" in report
    numbers = (out / "regime_map.md").read_text()
    assert numbers.count("| 50% ") == numbers.count("| 90% ") == 1  # one row per setting
    assert numbers.index("| 50% ") < numbers.index("| 90% ")  # in the study's order


def test_a_runs_config_comes_from_its_run_folder_where_ray_s_trial_folders_are_absent(tmp_path):
    """A study read from a store's copy holds its run folders, not Ray's trial folders: the
    analysis finds a run's config (a search trial's sampled values, a cohort member's) there."""
    from liftplace.config import resolve
    from liftplace.results import RUNS, STUDY_FILE, trial_config

    (tmp_path / STUDY_FILE).write_text(json.dumps({"name": "s", "layout": RUNS}))
    searched = resolve("smoke", {"objective.name": "place", "objective.group_size": 64, "train.lr": 3e-4}).to_dict()
    runs = {"t1": [("place", searched)],
            "t2": [("kd", resolve("smoke", {"objective.name": "kd"}).to_dict()),
                   ("place", resolve("smoke", {"objective.name": "place", "objective.group_size": 4}).to_dict())]}
    for trial, members in runs.items():
        for variant, config in members:
            folder = tmp_path / RUNS / f"{trial}-{variant}"
            folder.mkdir(parents=True)
            (folder / "run.json").write_text(json.dumps({"variant": variant, "seed": 0, "trial_dir": trial}))
            (folder / "config.json").write_text(json.dumps(config))
    got = trial_config(tmp_path, "t1", "place coarse=l2 group_size=64 lr=0.0003")  # a search's variant names its values
    assert (got.objective.group_size, got.train.lr) == (64, 3e-4)
    assert trial_config(tmp_path, "t2", "place").objective.group_size == 4
    assert trial_config(tmp_path, "t2", "kd").objective.name == "kd"
