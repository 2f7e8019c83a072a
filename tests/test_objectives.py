"""The mathematics of the objectives: the method's identities (moments + w = 1 is KD, one group
is LIFT, s = t gives zero loss, the fit is least squares), hand examples, bad options."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from liftplace.objectives import (
    PLACE_GROUP_SIZE,
    error_order,
    fit_lines,
    group_elements,
    group_length,
    make_objective,
    objective_class,
    objective_defaults,
    objective_names,
    objective_options,
)

torch.manual_seed(0)


def pair(shape=(3, 2, 8, 8), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=dtype)
    t = 0.7 * s + 0.2 + 0.3 * torch.randn(shape, generator=g, dtype=dtype)
    return s.requires_grad_(), t


# --- fit_lines ---------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(), (5,), (2, 3, 4)])
def test_fit_lines_equals_lstsq(lead):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(*lead, 37, generator=g, dtype=torch.float64)
    t = 2.5 * s - 1.0 + torch.randn(*lead, 37, generator=g, dtype=torch.float64)
    b0, b1 = fit_lines(s, t, eps=0.0)
    design = torch.stack([torch.ones_like(s), s], dim=-1)  # [..., n, 2]
    sol = torch.linalg.lstsq(design, t.unsqueeze(-1)).solution.squeeze(-1)
    torch.testing.assert_close(b0, sol[..., 0])
    torch.testing.assert_close(b1, sol[..., 1])
    assert b0.shape == lead


def test_fit_lines_hand_example():
    # s = 0..3, t = 0, 1, 2, 4: mean s 1.5, mean t 1.75, var 1.25, cov 1.625.
    b0, b1 = fit_lines(torch.tensor([0.0, 1, 2, 3]), torch.tensor([0.0, 1, 2, 4]), eps=0.0)
    assert b1.item() == pytest.approx(1.3)
    assert b0.item() == pytest.approx(-0.2)


# --- the hand example against the authors' formulation -----------------------------------


def one_channel(values):
    return torch.tensor(values, dtype=torch.float64).reshape(1, 1, 1, -1)


def test_lift_hand_example_l1_l2_and_sum():
    s, t = one_channel([0, 1, 2, 3]).requires_grad_(), one_channel([0, 1, 2, 4])
    # fit = -0.2 + 1.3 s = [-0.2, 1.1, 2.4, 3.7]; residual^2 = [.04, .01, .16, .09]
    # coarse (l1) = 0.2 + 0.3 = 0.5; w = 1 - 0.5 = 0.5; fine = mean = 0.075
    out = make_objective("lift", eps=0.0, task_weight=0.0)(s, t, step=0)
    assert out.coarse.item() == pytest.approx(0.5)
    assert out.fine.item() == pytest.approx(0.075)
    assert out.w.item() == pytest.approx(0.5)
    assert out.loss.item() == pytest.approx(0.5 + 0.5 * 0.075)
    l2 = make_objective("lift", eps=0.0, task_weight=0.0, coarse="l2")(s, t, step=0)
    assert l2.coarse.item() == pytest.approx(0.04 + 0.09)
    assert l2.w.item() == pytest.approx(0.5)  # w always uses the l1 distance, as the authors do
    summed = make_objective("lift", eps=0.0, task_weight=0.0, reduction="sum")(s, t, step=0)
    assert summed.loss.item() == pytest.approx(0.5 + 0.5 * 0.3)


def test_exact_line_gives_coarse_only_and_zero_weight():
    s, t = one_channel([0, 1, 2, 3]).requires_grad_(), one_channel([1, 3, 5, 7])  # t = 1 + 2 s
    out = make_objective("lift", eps=0.0, task_weight=0.0)(s, t, step=0)
    assert out.beta0.item() == pytest.approx(1.0) and out.beta1.item() == pytest.approx(2.0)
    assert out.coarse.item() == pytest.approx(2.0)
    assert out.fine.item() == pytest.approx(0.0, abs=1e-12)
    assert out.w.item() == 0.0
    assert out.loss.item() == pytest.approx(2.0)


def authors_place(s, t, group_size, eps):
    """The authors' formulation, written independently: sums for cov and var, argsort + gather,
    l1 coarse, detached fit in the fine term, all reduced by mean."""
    B, C = s.shape[:2]
    sf, tf = s.reshape(B, C, -1), t.reshape(B, C, -1)
    idx = torch.argsort((tf - sf).detach() ** 2, dim=-1, stable=True)
    sg = torch.gather(sf, -1, idx).reshape(B, C, -1, group_size)
    tg = torch.gather(tf, -1, idx).reshape(B, C, -1, group_size)
    xm, ym = sg.mean(-1, keepdim=True), tg.mean(-1, keepdim=True)
    cov = ((sg - xm) * (tg - ym)).sum(-1)
    var = ((sg - xm) ** 2).sum(-1)
    slope = cov / (var + eps)
    icpt = ym.squeeze(-1) - slope * xm.squeeze(-1)
    rec = (sg * slope.detach().unsqueeze(-1) + icpt.detach().unsqueeze(-1) - tg) ** 2
    sch = (slope - 1).abs().mean().item() + icpt.abs().mean().item()
    return ((slope - 1).abs() + icpt.abs()).mean() + (1 - min(1, sch)) * rec.mean()


@pytest.mark.parametrize("group_size", [4, 16, 64])
def test_place_matches_authors_formulation(group_size):
    s, t = pair((2, 3, 8, 8))
    authors_eps = 1e-4  # theirs divides sums; ours divides means: eps / n is the same fit
    ours = make_objective("place", group_size=group_size, eps=authors_eps / group_size, task_weight=0.0)
    out = ours(s, t, step=0)
    ref = authors_place(s, t, group_size, authors_eps)
    torch.testing.assert_close(out.loss, ref)
    (g_ours,) = torch.autograd.grad(out.loss, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g_ours, g_ref)


# --- identities --------------------------------------------------------------------------


@pytest.mark.parametrize("name,opts", [("lift", {}), ("place", {"group_size": 4}), ("place", {"num_groups": 8})])
def test_student_equal_teacher_gives_zero_loss_and_full_weight(name, opts):
    t = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    s = t.clone().requires_grad_()
    out = make_objective(name, eps=0.0, **opts)(s, t, step=0, target=t)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-12)
    assert out.w.item() == 1.0
    assert out.beta1.item() == pytest.approx(1.0) and out.beta0.item() == pytest.approx(0.0, abs=1e-12)


def test_large_deviation_gives_zero_weight():
    s, _ = pair()
    t = 4.0 * s.detach() + 3.0
    for name in ("lift", "place"):
        out = make_objective(name, task_weight=0.0)(s, t, step=0)
        assert out.w.item() == 0.0
        assert out.loss.item() == pytest.approx(out.coarse.item())


GROUPINGS = [
    ("lift", {}),
    ("lift", {"group_by": "sample"}),
    ("place", {"group_size": 4}),
    ("place", {"group_size": 16}),
    ("place", {"num_groups": 2}),
    ("place", {"group_size": 8, "group_by": "sample"}),
]


@pytest.mark.parametrize("name,opts", GROUPINGS)
def test_moments_with_unit_weight_is_kd_in_value_and_gradient(name, opts):
    s, t = pair()
    kd = make_objective("kd", task_weight=0.0)(s, t, step=0)
    mom = make_objective(name, coarse="moments", weighting="constant", w0=1.0, eps=0.0, task_weight=0.0, **opts)
    out = mom(s, t, step=0)
    torch.testing.assert_close(out.loss, kd.loss)
    (g_kd,) = torch.autograd.grad(kd.loss, s)
    (g_mom,) = torch.autograd.grad(out.loss, s)
    torch.testing.assert_close(g_mom, g_kd)
    # The two parts really split the MSE: neither is zero on this data.
    assert out.coarse.item() > 1e-3 and out.fine.item() > 1e-3


def test_one_group_per_channel_is_lift():
    s, t = pair()
    lift = make_objective("lift", task_weight=0.0)(s, t, step=0)
    for opts in ({"num_groups": 1}, {"group_size": 64}):
        place = make_objective("place", task_weight=0.0, **opts)(s, t, step=0)
        torch.testing.assert_close(place.loss, lift.loss)
        torch.testing.assert_close(place.beta1, lift.beta1)


def test_place_fits_piecewise_affine_where_lift_cannot():
    # Two error regimes in every channel: half the elements have t = s (error 0), half have
    # t = 3 s + 5 with s in [0, 1] (error >= 25). Sorting by error separates them exactly.
    g = torch.Generator().manual_seed(3)
    s = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 3, 64, generator=g).argsort(-1) < 32  # exactly half per channel
    t = torch.where(mask.reshape(s.shape), s, 3 * s + 5)
    s.requires_grad_()
    lift = make_objective("lift", eps=0.0, task_weight=0.0)(s, t, step=0)
    place = make_objective("place", num_groups=2, eps=0.0, task_weight=0.0)(s, t, step=0)
    assert place.fine.item() < 1e-20
    assert lift.fine.item() > 1.0


def test_group_elements_matches_a_loop():
    s, t = pair((2, 3, 4, 4))
    s_g, t_g = group_elements(s, t, group_size=4)
    assert s_g.shape == (2, 3, 4, 4)
    for b in range(2):
        for c in range(3):
            err = (t[b, c] - s[b, c]).flatten() ** 2
            order = sorted(range(16), key=lambda i: (err[i].item(), i))
            torch.testing.assert_close(s_g[b, c].flatten(), s[b, c].flatten()[order])
            torch.testing.assert_close(t_g[b, c].flatten(), t[b, c].flatten()[order])


def test_error_order_matches_torch_sort_with_ties_and_nan():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 3, 300, generator=g)
    t = s + torch.randn(4, 3, 300, generator=g)
    t[0, 0, :100] = s[0, 0, :100]  # ties at zero error
    t[1, 1, 7] = float("nan")
    ref = torch.sort((t - s) ** 2, dim=-1, stable=True).indices
    assert torch.equal(error_order(s, t), ref)


# --- gradients, dtypes, stability --------------------------------------------------------


@pytest.mark.parametrize("name", ["kd", "lift", "place"])
def test_gradients_reach_student_never_teacher(name):
    s, t = pair(dtype=torch.float32)
    t = t.clone().requires_grad_()
    out = make_objective(name)(s, t, step=10, target=torch.zeros_like(t))
    out.loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("name", ["kd", "lift", "place"])
def test_float32_and_float64_agree(name):
    s64, t64 = pair(dtype=torch.float64)
    s32, t32 = s64.detach().float().requires_grad_(), t64.float()
    obj = make_objective(name, task_weight=0.0)
    out64, out32 = obj(s64, t64, step=0), obj(s32, t32, step=0)
    assert out32.loss.dtype == torch.float32 and out64.loss.dtype == torch.float64
    assert out32.loss.item() == pytest.approx(out64.loss.item(), rel=1e-4)


@pytest.mark.parametrize("name,opts", [("lift", {}), ("place", {"group_size": 4}), ("place", {"coarse": "moments"})])
def test_constant_student_stays_finite(name, opts):
    s = torch.full((2, 3, 8, 8), 0.5, requires_grad=True)
    t = torch.randn(2, 3, 8, 8)
    out = make_objective(name, **opts)(s, t, step=0, target=t)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(s.grad).all()
    assert out.beta1.item() == 0.0  # no spread in s: the fitted slope is zero, not inf


def test_kd_and_task_values():
    s, t = pair()
    target = torch.randn_like(t)
    kd = make_objective("kd")(s, t, step=0, target=target)
    assert kd.loss.item() == pytest.approx((F.mse_loss(s, t) + F.mse_loss(s, target)).item())
    assert math.isnan(kd.w.item()) and math.isfinite(kd.beta1.item())
    task = make_objective("task")(s, None, step=0, target=target)
    assert task.loss.item() == pytest.approx(F.mse_loss(s, target).item())
    weighted = make_objective("place", task_weight=0.5, distill_weight=2.0)(s, t, step=0, target=target)
    alone = make_objective("place", task_weight=0.0)(s, t, step=0)
    assert weighted.loss.item() == pytest.approx(0.5 * F.mse_loss(s, target).item() + 2 * alone.loss.item())


# --- weighting schedules -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,step,expected",
    [("linear", 0, 0.0), ("linear", 50, 0.5), ("linear", 500, 1.0), ("cosine", 50, 0.5), ("cosine", 0, 0.0),
     ("cosine", 100, 1.0), ("step", 99, 0.0), ("step", 100, 1.0), ("constant", 7, 0.3)],
)
def test_schedules(kind, step, expected):
    s, t = pair()
    out = make_objective("lift", weighting=kind, warmup=100, w0=0.3)(s, t, step=step, target=t)
    assert out.w.item() == pytest.approx(expected)


def test_learnable_weight_is_a_trained_parameter():
    s, t = pair()
    obj = make_objective("lift", weighting="learnable", w0=0.25, task_weight=0.0)
    params = list(obj.parameters())
    assert len(params) == 1
    out = obj(s, t, step=0)
    assert out.w.item() == pytest.approx(0.25)
    out.loss.backward()
    assert params[0].grad is not None and params[0].grad.item() > 0  # d loss / d w = fine > 0


# --- bad options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,opts,words",
    [
        ("nope", {}, ["nope", "kd", "place"]),
        ("place", {"coarse": "l3"}, ["l3", "moments"]),
        ("place", {"weighting": "sigmoid"}, ["sigmoid", "adaptive"]),
        ("place", {"group_by": "pixel"}, ["pixel", "channel"]),
        ("place", {"reduction": "max"}, ["max", "mean"]),
        ("place", {"group_size": 0}, ["group_size", "0"]),
        ("place", {"group_size": -4}, ["group_size", "-4"]),
        ("place", {"num_groups": 0}, ["num_groups", "0"]),
        ("place", {"group_size": 2.5}, ["group_size", "2.5"]),
        ("place", {"group_size": 4, "num_groups": 4}, ["not both"]),
        ("place", {"group_size": 24, "shape": (1, 16, 16)}, ["24", "256"]),
        ("place", {"num_groups": 3, "shape": (3, 8, 8)}, ["3", "64"]),
        ("lift", {"group_size": 16}, ["group_size", "place"]),
        ("place", {"weighting": "constant", "w0": 1.5}, ["w0", "1.5"]),
        ("place", {"weighting": "linear", "warmup": 0}, ["warmup", "0"]),
        ("place", {"eps": -1.0}, ["eps"]),
        ("kd", {"task_weight": -1.0}, ["task_weight"]),
        ("task", {"task_weight": 0.0}, ["task_weight"]),
    ],
)
def test_bad_options_are_refused_at_construction(name, opts, words):
    with pytest.raises(ValueError) as err:
        make_objective(name, **opts)
    for word in words:
        assert word in str(err.value)


def test_group_size_that_does_not_divide_is_refused_at_call():
    obj = make_objective("place", group_size=24)
    s, t = pair((2, 1, 16, 16))
    with pytest.raises(ValueError, match="24.*256"):
        obj(s, t, step=0, target=t)


def test_shape_mismatch_names_both_shapes():
    s, t = pair((2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\).*\(2, 3, 4, 4\)"):
        make_objective("kd")(s, t[..., :4, :4], step=0, target=t)


def test_registry_lists_the_objectives():
    assert {"task", "kd", "lift", "place", "feat", "kd+feat", "place+feat"} <= set(objective_names())


# --- feature KD --------------------------------------------------------------------------


def feats(channels, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, 4, 4, generator=g, requires_grad=grad) for c in channels]


def test_feat_with_equal_widths_is_mean_feature_mse():
    s_f, t_f = feats([4, 8], 0, grad=True), feats([4, 8], 1)
    s, t = pair()
    obj = make_objective("feat", student_channels=[4, 8], teacher_channels=[4, 8], task_weight=0.0)
    assert not list(obj.parameters())  # identity adapters where widths match
    out = obj(s, t, step=0, features=(s_f, t_f))
    expected = (F.mse_loss(s_f[0], t_f[0]) + F.mse_loss(s_f[1], t_f[1])) / 2
    assert out.loss.item() == pytest.approx(expected.item())
    both = make_objective("kd+feat", student_channels=[4, 8], teacher_channels=[4, 8], feat_weight=0.5, task_weight=0.0)
    out2 = both(s, t, step=0, features=(s_f, t_f))
    assert out2.loss.item() == pytest.approx(F.mse_loss(s, t).item() + 0.5 * expected.item())


def test_feat_adapters_train_and_teacher_features_get_no_gradient():
    s_f, t_f = feats([2, 3], 0, grad=True), feats([4, 8], 1, grad=True)
    s, t = pair()
    obj = make_objective("feat", student_channels=[2, 3], teacher_channels=[4, 8], task_weight=0.0)
    assert [p.shape for p in obj.parameters()] == [(4, 2, 1, 1), (4,), (8, 3, 1, 1), (8,)]
    obj(s, t, step=0, features=(s_f, t_f)).loss.backward()
    assert all(p.grad is not None for p in obj.parameters())
    assert s_f[0].grad is not None and t_f[0].grad is None


def test_feat_on_real_models_through_feature_taps():
    from liftplace import models

    teacher = models.build_unet("tiny")
    student = models.prune_student(teacher, 0.5)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    with models.FeatureTaps(teacher) as t_taps, models.FeatureTaps(student) as s_taps:
        obj = make_objective("kd+feat", student_channels=s_taps.channels(), teacher_channels=t_taps.channels())
        with torch.no_grad():
            t_out = models.predict(teacher, x, t)
        t_feats = list(t_taps.features)
        s_out = models.predict(student, x, t)
        out = obj(s_out, t_out, step=0, target=torch.randn_like(x), features=(list(s_taps.features), t_feats))
    out.loss.backward()
    assert torch.isfinite(out.feat) and out.feat.item() > 0
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_feat_refuses_bad_input():
    with pytest.raises(ValueError, match="student_channels and teacher_channels"):
        make_objective("feat")
    with pytest.raises(ValueError, match="student_channels and teacher_channels"):
        make_objective("feat", student_channels=[1, 2], teacher_channels=[1])
    obj = make_objective("feat", student_channels=[4], teacher_channels=[4], task_weight=0.0)
    s, t = pair()
    with pytest.raises(ValueError, match="needs features"):
        obj(s, t, step=0)
    with pytest.raises(ValueError, match="1 feature taps"):
        obj(s, t, step=0, features=(feats([4, 4], 0), feats([4, 4], 1)))


# --- place+feat: the authors' "ours" ----------------------------------------------------

S_WIDTHS, T_WIDTHS = [2, 3, 4], [4, 3, 8]  # the middle block matches: an identity adapter


def feature_term(adapters, s_feats, t_feats, reduction):
    """The feature term written independently: per block MSE(W s_i + b, t_i) with the 1x1
    conv as an einsum over channels (identity where no adapter), then mean or sum over blocks."""
    losses = []
    for adapter, s, t in zip(adapters, s_feats, t_feats):
        if isinstance(adapter, torch.nn.Conv2d):
            s = torch.einsum("oc,bchw->bohw", adapter.weight[:, :, 0, 0], s)
            if adapter.bias is not None:
                s = s + adapter.bias[None, :, None, None]
        losses.append(((s - t) ** 2).mean())
    total = sum(losses)
    return total / len(losses) if reduction == "mean" else total


def feature_problem(seed=0):
    s, t = pair(seed=seed)
    s_f = [f.double().detach().requires_grad_() for f in feats(S_WIDTHS, seed + 10)]
    t_f = [f.double() for f in feats(T_WIDTHS, seed + 20)]
    return s, t, torch.randn_like(t), s_f, t_f


@pytest.mark.parametrize("opts", [
    {},
    {"feat_weight": 0.3, "feat_reduction": "mean", "feat_bias": True, "feat_init": "default"},
    {"feat_weight": 2.0, "group_size": 4, "coarse": "moments", "distill_weight": 0.5, "task_weight": 0.25},
    {"feat_weight": 0.7, "num_groups": 2, "reduction": "sum", "weighting": "constant", "w0": 0.4, "coarse": "l2"},
    {"feat_weight": 1.5, "group_size": 8, "group_by": "sample", "eps": 1e-3, "weighting": "learnable", "w0": 0.3},
])
def test_place_feat_is_place_plus_weighted_feature_term_in_value_and_gradient(opts):
    """loss = task_weight task + distill_weight PLACE + feat_weight feat, with PLACE exactly
    place's: the value, and the gradient w.r.t. the student's output, its block features and the
    adapters' weights, against place and an independently written feature term."""
    s, t, target, s_f, t_f = feature_problem()
    line_opts = {k: v for k, v in opts.items() if not k.startswith("feat_")}
    place = make_objective("place", **line_opts).double()
    obj = make_objective("place+feat", student_channels=S_WIDTHS, teacher_channels=T_WIDTHS, **opts).double()
    assert obj.group_size == place.group_size and obj.num_groups == place.num_groups
    place.load_state_dict({k: v for k, v in obj.state_dict().items() if not k.startswith("adapters.")})  # a learnable w
    out = obj(s, t, step=5, target=target, features=(s_f, t_f))
    ref_place = place(s, t, step=5, target=target)
    adapter_params = list(obj.adapters.parameters())
    feat = feature_term(obj.adapters, s_f, t_f, obj.feat_reduction)
    ref = ref_place.loss + obj.feat_weight * feat
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.feat, feat.detach(), rtol=1e-12, atol=0)
    inputs = [s, *s_f, *adapter_params, *place.parameters()]
    ours = [s, *s_f, *adapter_params, *(p for n, p in obj.named_parameters() if not n.startswith("adapters."))]
    g_out = torch.autograd.grad(out.loss, ours, allow_unused=True)
    g_ref = torch.autograd.grad(ref, inputs, allow_unused=True)
    assert all(g is not None for g in g_out[:1 + len(s_f) + len(adapter_params)])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)
    # the logged parts: PLACE's diagnostics and terms, the feature term
    for key in ("coarse", "fine", "w", "beta0", "beta1", "task", "distill"):
        torch.testing.assert_close(getattr(out, key), getattr(ref_place, key), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss, out.task * obj.task_weight + obj.distill_weight * out.distill
                               + obj.feat_weight * out.feat, rtol=1e-12, atol=0)
    if "feat_weight" not in opts:  # the authors' defaults: summed blocks, bias-free adapters
        torch.testing.assert_close(out.feat, sum(F.mse_loss(a(x), y) for a, x, y in zip(obj.adapters, s_f, t_f)))
        assert obj.feat_weight == 1e-6


@pytest.mark.parametrize("opts", [{}, {"group_size": 4, "weighting": "learnable", "w0": 0.3}])
def test_place_feat_with_zero_feature_weight_is_place_exactly(opts):
    s, t, target, s_f, t_f = feature_problem(seed=1)
    torch.manual_seed(0)
    place = make_objective("place", **opts).double()
    torch.manual_seed(0)
    obj = make_objective("place+feat", student_channels=S_WIDTHS, teacher_channels=T_WIDTHS, feat_weight=0.0,
                         **opts).double()
    out = obj(s, t, step=2, target=target, features=(s_f, t_f))
    ref = place(s, t, step=2, target=target)
    assert torch.equal(out.loss, ref.loss)
    params = [p for n, p in obj.named_parameters() if not n.startswith("adapters.")]
    g_out = torch.autograd.grad(out.loss, [s, *params])
    g_ref = torch.autograd.grad(ref.loss, [s, *place.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(g_out, g_ref))
    assert out.loss.grad_fn is not None and torch.isfinite(out.feat) and out.feat > 0  # still logged
    assert not out.feat.requires_grad


def test_feature_sum_over_blocks_is_blocks_times_mean():
    s, t, _, s_f, t_f = feature_problem(seed=2)
    for name in ("feat", "kd+feat", "place+feat"):
        built = {}
        for reduction in ("mean", "sum"):
            torch.manual_seed(3)  # the same adapters
            built[reduction] = make_objective(name, student_channels=S_WIDTHS, teacher_channels=T_WIDTHS,
                                              feat_reduction=reduction, feat_weight=0.5, task_weight=0.0,
                                              distill_weight=0.0 if name == "place+feat" else 1.0).double()
        assert all(torch.equal(a, b) for a, b in zip(built["mean"].parameters(), built["sum"].parameters()))
        mean = built["mean"](s, t, step=0, features=(s_f, t_f))
        summed = built["sum"](s, t, step=0, features=(s_f, t_f))
        blocks = len(S_WIDTHS)
        torch.testing.assert_close(summed.feat, blocks * mean.feat, rtol=1e-12, atol=0)
        g_mean = torch.autograd.grad(mean.loss, s_f)
        g_sum = torch.autograd.grad(summed.loss, s_f)
        for a, b in zip(g_sum, g_mean):
            torch.testing.assert_close(a, blocks * b, rtol=1e-12, atol=0)


def test_adapters_bias_and_uniform_init():
    torch.manual_seed(0)
    obj = make_objective("feat", student_channels=[2, 3, 5], teacher_channels=[4, 3, 8], feat_bias=False,
                         feat_init="uniform", feat_init_scale=0.01)
    shapes = [(n, tuple(p.shape)) for n, p in obj.named_parameters()]
    assert shapes == [("adapters.0.weight", (4, 2, 1, 1)), ("adapters.2.weight", (8, 5, 1, 1))]
    assert isinstance(obj.adapters[1], torch.nn.Identity)  # equal widths: no adapter, whatever the options
    assert obj.adapters[0].bias is None and obj.adapters[2].bias is None
    weights = torch.cat([p.flatten() for p in obj.parameters()])
    assert weights.abs().max() <= 0.01 and weights.abs().max() > 0.005  # spread over the range, not stuck at 0
    with_bias = make_objective("kd+feat", student_channels=[2], teacher_channels=[64], feat_init="uniform",
                               feat_init_scale=0.02)
    assert with_bias.adapters[0].bias.shape == (64,) and with_bias.adapters[0].bias.abs().max() <= 0.02
    assert with_bias.adapters[0].bias.abs().max() > 0.01
    # place+feat's defaults: no bias, uniform in +-0.005
    pf = make_objective("place+feat", student_channels=[16, 32], teacher_channels=[64, 128])
    assert [n for n, _ in pf.named_parameters()] == ["adapters.0.weight", "adapters.1.weight"]
    weights = torch.cat([p.flatten() for p in pf.parameters()])
    assert weights.abs().max() <= 0.005 and weights.abs().max() > 0.0049  # 10k draws reach the edge
    # feat's and kd+feat's default adapters are still torch's Conv2d, drawn from the same random stream
    for name in ("feat", "kd+feat"):
        torch.manual_seed(7)
        obj = make_objective(name, student_channels=[2, 3], teacher_channels=[4, 8])
        torch.manual_seed(7)
        ref = torch.nn.ModuleList([torch.nn.Conv2d(2, 4, kernel_size=1), torch.nn.Conv2d(3, 8, kernel_size=1)])
        state = obj.state_dict()
        assert list(state) == ["adapters.0.weight", "adapters.0.bias", "adapters.1.weight", "adapters.1.bias"]
        assert all(torch.equal(state[f"adapters.{k}"], v) for k, v in ref.state_dict().items())


AUTHORS_FEATURE_TERM = {"feat_weight": 1e-6, "feat_reduction": "sum", "feat_bias": False, "feat_init": "uniform",
                        "feat_init_scale": 0.005}
TODAYS_FEATURE_TERM = {"feat_weight": 1.0, "feat_reduction": "mean", "feat_bias": True, "feat_init": "default",
                       "feat_init_scale": 0.005}


@pytest.mark.parametrize("name,expected", [("place+feat", AUTHORS_FEATURE_TERM), ("feat", TODAYS_FEATURE_TERM),
                                           ("kd+feat", TODAYS_FEATURE_TERM)])
def test_feature_objectives_defaults(name, expected):
    """place+feat defaults to the authors' "ours" (K = 16, 1e-6 x summed features through bias-free
    uniform adapters); feat and kd+feat keep the project's, also through a config's None."""
    from liftplace.config import resolve

    defaults = objective_defaults(name)
    assert {k: defaults[k] for k in expected} == expected
    config = resolve("smoke", {"objective.name": name}, check_paths=False)
    assert all(getattr(config.objective, k) is None for k in ("feat_weight", "feat_reduction", "feat_bias", "feat_init"))
    obj = make_objective(name, **config.objective_options(), student_channels=[2], teacher_channels=[4])
    assert {k: getattr(obj, k) for k in expected} == expected
    assert (obj.adapters[0].bias is None) == (not expected["feat_bias"])
    assert (obj.task_weight, obj.distill_weight) == (1.0, 1.0)
    if name == "place+feat":
        place = make_objective("place")
        assert obj.group_size == PLACE_GROUP_SIZE == 16 and obj.num_groups is None
        assert (obj.coarse, obj.eps, obj.reduction, obj.group_by, obj.weighting.kind) == (
            place.coarse, place.eps, place.reduction, place.group_by, place.weighting.kind)
    # a config value overrides the objective's default
    chosen = resolve("smoke", {"objective.name": name, "objective.feat_weight": 0.25, "objective.feat_bias": "true",
                               "objective.feat_reduction": "mean"}, check_paths=False)
    obj = make_objective(name, **chosen.objective_options(), student_channels=[2], teacher_channels=[4])
    assert (obj.feat_weight, obj.feat_bias, obj.feat_reduction) == (0.25, True, "mean")
    assert obj.adapters[0].bias is not None


@pytest.mark.parametrize("name", ["feat", "kd+feat", "place+feat"])
@pytest.mark.parametrize("opts,words", [
    ({"feat_reduction": "max"}, ["feat_reduction", "'max'", "mean, sum"]),
    ({"feat_init": "normal"}, ["feat_init", "'normal'", "default, uniform"]),
    ({"feat_bias": "yes"}, ["feat_bias", "'yes'"]),
    ({"feat_init_scale": 0.0}, ["feat_init_scale", "0.0"]),
    ({"feat_init_scale": float("nan")}, ["feat_init_scale", "nan"]),
    ({"feat_weight": -1.0}, ["feat_weight", "-1.0"]),
])
def test_bad_feature_options_are_refused(name, opts, words):
    with pytest.raises(ValueError) as err:
        make_objective(name, student_channels=[2], teacher_channels=[4], **opts)
    assert all(word in str(err.value) for word in words)


@pytest.mark.parametrize("key,value,words", [
    ("feat_reduction", "max", ["objective.feat_reduction", "'max'", "mean, sum"]),
    ("feat_init", "normal", ["objective.feat_init", "'normal'", "default, uniform"]),
    ("feat_bias", "maybe", ["objective.feat_bias", "maybe"]),
    ("feat_init_scale", "-0.1", ["objective.feat_init_scale", "-0.1"]),
    ("feat_weight", "-1", ["objective.feat_weight", "-1"]),
    ("group_size", "24", ["objective", "group_size 24", "256"]),  # place+feat's grouping, checked before a run
])
def test_config_refuses_bad_feature_options_naming_the_key(key, value, words):
    from liftplace.config import resolve

    with pytest.raises(ValueError) as err:
        resolve("smoke", {"objective.name": "place+feat", f"objective.{key}": value}, check_paths=False)
    message = str(err.value)
    assert "\n" not in message and all(word in message for word in words)


def test_place_feat_refuses_missing_features_and_place_options_it_refuses():
    obj = make_objective("place+feat", student_channels=[2], teacher_channels=[4])
    s, t = pair(dtype=torch.float32)
    with pytest.raises(ValueError, match="needs features"):
        obj(s, t, step=0, target=t)
    with pytest.raises(ValueError, match="not both"):
        make_objective("place+feat", student_channels=[2], teacher_channels=[4], group_size=4, num_groups=4)
    with pytest.raises(ValueError, match="student_channels and teacher_channels"):
        make_objective("place+feat")


def test_place_feat_trains_through_the_real_loop(tiny_teacher_dir):
    """A few steps of distill.run (no Ray) with the authors' "ours": the rows carry PLACE's
    diagnostics and the feature term, and loss = task + PLACE + 1e-6 feat."""
    from liftplace import distill
    from liftplace.config import resolve

    config = resolve("smoke", {"teacher.name": str(tiny_teacher_dir), "student.prune_ratio": 0.5,
                               "eval.num_images": 32, "eval.sampler_steps": 2, "train.steps": 4,
                               "train.log_every": 2, "objective.name": "place+feat"})
    rows = []
    last = distill.run(config, lambda row, checkpoint: rows.append(row), log=lambda *_: None)
    assert [r["step"] for r in rows] == [2, 4] and not last["diverged"]
    for row in rows:
        for key in ("loss", "loss_task", "loss_distill", "loss_coarse", "loss_fine", "loss_feat", "beta0", "beta1"):
            assert math.isfinite(row[key]), key
        assert 0 <= row["w"] <= 1 and row["loss_feat"] > 0
        assert row["loss"] == pytest.approx(row["loss_task"] + row["loss_distill"] + 1e-6 * row["loss_feat"], rel=1e-5)


# --- options, classes and group lengths --------------------------------------------------

ALL_SETTINGS = {
    "coarse": "l2", "group_size": None, "num_groups": None, "group_by": "channel", "eps": 1e-3,
    "reduction": "sum", "weighting": "constant", "w0": 0.5, "warmup": 10, "task_weight": 0.25,
    "distill_weight": 2.0, "feat_weight": 0.5, "feat_reduction": "sum", "feat_bias": None, "feat_init": "uniform",
    "feat_init_scale": 0.01, "name": "ignored", "something_else": 1,
}
LINE_OPTIONS = {"coarse", "group_size", "num_groups", "group_by", "eps", "reduction", "weighting", "w0", "warmup",
                "task_weight", "distill_weight"}
FEAT_OPTIONS = {"feat_weight", "feat_reduction", "feat_bias", "feat_init", "feat_init_scale", "task_weight",
                "distill_weight"}


@pytest.mark.parametrize(
    "name,expected",
    [
        ("task", {"task_weight"}),
        ("kd", {"task_weight", "distill_weight"}),
        ("lift", LINE_OPTIONS),
        ("place", LINE_OPTIONS),
        ("feat", FEAT_OPTIONS),
        ("kd+feat", FEAT_OPTIONS),
        ("place+feat", LINE_OPTIONS | FEAT_OPTIONS),
    ],
)
def test_objective_options_are_what_the_constructor_takes(name, expected):
    opts = objective_options(name, ALL_SETTINGS)
    assert set(expected) <= set(objective_defaults(name))  # the constructor takes them all...
    # ... and a None setting is left out: "the objective's own default", its constructor's
    assert set(opts) == {key for key in expected if ALL_SETTINGS[key] is not None}
    assert all(opts[k] == ALL_SETTINGS[k] for k in opts)
    assert not {"shape", "student_channels", "teacher_channels"} & set(objective_options(
        name, {**ALL_SETTINGS, "shape": (1, 4, 4), "student_channels": [1], "teacher_channels": [1]}))
    extra = {"student_channels": [4], "teacher_channels": [4]} if objective_class(name).needs_features else {}
    obj = make_objective(name, **opts, **extra, shape=(1, 4, 4))
    assert obj.task_weight == 0.25
    if name != "task":
        assert obj.distill_weight == 2.0


def test_objective_options_from_a_config_build_every_objective():
    from liftplace.config import ObjectiveConfig

    for name in objective_names():
        settings_ = dataclasses.asdict(ObjectiveConfig(name=name))
        extra = {"student_channels": [4], "teacher_channels": [4]} if objective_class(name).needs_features else {}
        make_objective(name, **objective_options(name, settings_), **extra, shape=(3, 8, 8))
    # lift takes group_size so that a config that sets it is refused with a reason, not ignored
    with pytest.raises(ValueError, match="lift fits one group per channel; group_size is a place option"):
        make_objective("lift", **objective_options("lift", {**ALL_SETTINGS, "group_size": 16}))


def test_lift_and_place_read_the_options_they_take():
    lift = make_objective("lift", **objective_options("lift", ALL_SETTINGS))
    assert (lift.coarse, lift.eps, lift.reduction, lift.weighting.kind, lift.weighting.w0) == ("l2", 1e-3, "sum", "constant", 0.5)
    assert (lift.group_size, lift.num_groups) == (None, None)
    place = make_objective("place", **objective_options("place", ALL_SETTINGS))
    assert (place.group_size, place.num_groups) == (PLACE_GROUP_SIZE, None)


def test_objective_class_and_flags():
    assert objective_class("place").name == "place"
    assert {n for n in objective_names() if objective_class(n).needs_features} == {"feat", "kd+feat", "place+feat"}
    assert not objective_class("task").needs_teacher
    with pytest.raises(ValueError) as err:
        objective_class("nope")
    assert all(word in str(err.value) for word in ("nope", "kd", "lift", "place"))


def test_place_default_group_size_is_the_constant():
    assert PLACE_GROUP_SIZE == 16
    s, t = pair((2, 3, 8, 8))
    default = make_objective("place", task_weight=0.0)(s, t, step=0)
    explicit = make_objective("place", group_size=PLACE_GROUP_SIZE, task_weight=0.0)(s, t, step=0)
    other = make_objective("place", group_size=8, task_weight=0.0)(s, t, step=0)
    assert torch.equal(default.loss, explicit.loss) and not torch.equal(default.loss, other.loss)


@pytest.mark.parametrize(
    "name,opts,shape,expected",
    [
        ("place", {}, (3, 8, 8), 16),
        ("place", {"group_by": "sample"}, (3, 8, 8), 16),
        ("place", {"group_size": 32}, (3, 8, 8), 32),
        ("place", {"num_groups": 8}, (3, 16, 16), 32),  # 256 / 8
        ("place", {"num_groups": 8, "group_by": "sample"}, (3, 16, 16), 96),  # 3 * 256 / 8
        ("place", {"num_groups": 2, "group_by": "sample"}, (1, 4, 4), 8),
        ("lift", {}, (3, 8, 8), 64),
        ("lift", {"group_by": "sample"}, (3, 8, 8), 192),
        ("lift", {"group_size": None, "num_groups": None}, (2, 5), 5),
        ("place+feat", {}, (3, 8, 8), 16),  # place's grouping; no feature widths needed
        ("place+feat", {"num_groups": 8, "feat_weight": 0.5}, (3, 16, 16), 32),
    ],
)
def test_group_length(name, opts, shape, expected):
    assert group_length(name, opts, shape) == expected
    s, t = pair((2, *shape))
    extra = {"student_channels": [4], "teacher_channels": [4]} if objective_class(name).needs_features else {}
    obj = make_objective(name, **opts, **extra)
    s_g, _ = group_elements(s, t, group_size=obj.group_size, num_groups=obj.num_groups, group_by=obj.group_by)
    assert s_g.shape[-1] == expected


def test_group_length_refuses_what_place_refuses():
    with pytest.raises(ValueError, match="num_groups 3 does not divide the 64"):
        group_length("place", {"num_groups": 3}, (3, 8, 8))
    with pytest.raises(ValueError, match="group_size 40 does not divide the 192"):
        group_length("place", {"group_size": 40, "group_by": "sample"}, (3, 8, 8))
    with pytest.raises(ValueError, match="group_size is a place option"):
        group_length("lift", {"group_size": 16}, (3, 8, 8))
    with pytest.raises(ValueError, match="no groups"):
        group_length("kd", {}, (3, 8, 8))


# --- logging-only diagnostics ------------------------------------------------------------


@pytest.mark.parametrize("name", ["kd", "lift", "place", "feat", "place+feat"])
def test_diagnostics_off_skips_only_logging(name):
    s, t = pair(dtype=torch.float32)
    target = torch.randn_like(t)
    with_feats = objective_class(name).needs_features
    extra = {"student_channels": [4], "teacher_channels": [4]} if with_feats else {}
    features = (feats([4], 0), feats([4], 1)) if with_feats else None
    obj = make_objective(name, **extra)
    on = obj(s, t, step=3, target=target, features=features)
    (g_on,) = torch.autograd.grad(on.loss, s)
    off = obj(s, t, step=3, target=target, features=features, diagnostics=False)
    (g_off,) = torch.autograd.grad(off.loss, s)
    assert torch.equal(on.loss, off.loss) and torch.equal(g_on, g_off)
    assert torch.isfinite(on.beta0) and torch.isfinite(on.beta1)
    if name in ("lift", "place", "place+feat"):  # their betas are part of the loss: logged either way
        assert torch.equal(on.beta1, off.beta1) and torch.equal(on.w, off.w)
    else:
        assert math.isnan(off.beta0.item()) and math.isnan(off.beta1.item())


# --- properties (hypothesis) -------------------------------------------------------------


def divisors(n, low=1):
    return [d for d in range(low, n + 1) if n % d == 0]


@st.composite
def grouped_problems(draw, min_group=2):
    """(shape [B, C, H, W], objective name, grouping options, seed) with a grouping that fits."""
    # W >= min_group: every domain can hold at least one group that large
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(min_group, 6)))
    group_by = draw(st.sampled_from(["channel", "sample"]))
    n = math.prod(shape[2:]) * (shape[1] if group_by == "sample" else 1)
    size = draw(st.sampled_from(divisors(n, low=min_group)))
    if size == n and draw(st.booleans()):
        name, opts = "lift", {}
    elif draw(st.booleans()):
        name, opts = "place", {"group_size": size}
    else:
        name, opts = "place", {"num_groups": n // size}
    return shape, name, {**opts, "group_by": group_by}, draw(st.integers(0, 2**31 - 1))


def random_pair(shape, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.randn(1, generator=g, dtype=torch.float64) * s + torch.randn(shape, generator=g, dtype=torch.float64)
    return s.requires_grad_(), t


def reference_line_terms(s, t, *, coarse, reduction, eps, w, group_size=None, num_groups=None, group_by="channel"):
    """LIFT/PLACE's distillation term by autograd through group_elements and fit_lines: the
    definition the objectives' hand-written backward must reproduce."""
    s_g, t_g = group_elements(s, t, group_size=group_size, num_groups=num_groups, group_by=group_by)
    b0, b1 = fit_lines(s_g, t_g, eps)
    if coarse == "moments":
        fit = b0.unsqueeze(-1) + b1.unsqueeze(-1) * s_g
        per = (fit - s_g).square()
    else:
        fit = b0.detach().unsqueeze(-1) + b1.detach().unsqueeze(-1) * s_g
        per = b0.abs() + (b1 - 1).abs() if coarse == "l1" else b0.square() + (b1 - 1).square()
    reduce = torch.mean if reduction == "mean" else torch.sum
    return reduce(per) + w * reduce((t_g - fit).square())


@settings(max_examples=80, deadline=None)
@given(grouped_problems(min_group=2), st.sampled_from(["l1", "l2", "moments"]), st.sampled_from(["mean", "sum"]),
       st.sampled_from([0.0, 1e-4, 0.5]), st.floats(0.0, 1.0), st.floats(-3.0, 3.0))
def test_property_line_terms_match_autograd_through_fit_lines(problem, coarse, reduction, eps, w, offset):
    shape, name, opts, seed = problem
    s, t = random_pair(shape, seed)
    s = (s.detach() + offset).requires_grad_()  # groups with a mean away from zero
    obj = make_objective(name, coarse=coarse, reduction=reduction, eps=eps, weighting="constant", w0=w,
                         task_weight=0.0, **opts)
    out = obj(s, t, step=0)
    ref = reference_line_terms(s, t, coarse=coarse, reduction=reduction, eps=eps, w=w, group_size=obj.group_size,
                               num_groups=obj.num_groups, group_by=obj.group_by)
    torch.testing.assert_close(out.loss, ref)
    (g_out,) = torch.autograd.grad(out.loss, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-6, atol=1e-9 * max(1.0, g_ref.abs().max().item()))


@settings(max_examples=60, deadline=None)
@given(grouped_problems(min_group=3))
def test_property_moments_with_unit_weight_is_kd(problem):
    shape, name, opts, seed = problem
    s, t = random_pair(shape, seed)
    kd = F.mse_loss(s, t)
    obj = make_objective(name, coarse="moments", weighting="constant", w0=1.0, eps=0.0, task_weight=0.0, **opts)
    out = obj(s, t, step=0, diagnostics=False)
    torch.testing.assert_close(out.loss, kd, rtol=1e-7, atol=1e-9)
    (g_kd,) = torch.autograd.grad(kd, s)
    (g_mom,) = torch.autograd.grad(out.loss, s)
    torch.testing.assert_close(g_mom, g_kd, rtol=1e-6, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(grouped_problems(min_group=2), st.sampled_from(["l1", "l2", "moments"]), st.sampled_from(["mean", "sum"]))
def test_property_student_equal_teacher_gives_zero_loss_and_unit_weight(problem, coarse, reduction):
    shape, name, opts, seed = problem
    t, _ = random_pair(shape, seed)
    s = t.detach().clone().requires_grad_()
    out = make_objective(name, coarse=coarse, reduction=reduction, eps=0.0, task_weight=0.0, **opts)(s, t.detach(), step=0)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-12)
    assert out.w.item() == 1.0
    (grad,) = torch.autograd.grad(out.loss, s)
    assert grad.abs().max().item() == pytest.approx(0.0, abs=1e-10)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(3, 40), st.floats(-5, 5), st.floats(-5, 5), st.integers(0, 2**31 - 1))
def test_property_fit_lines_is_least_squares_per_row(rows, n, slope, intercept, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, n, generator=g, dtype=torch.float64)
    t = intercept + slope * s + torch.randn(rows, n, generator=g, dtype=torch.float64)
    b0, b1 = fit_lines(s, t, eps=0.0)
    for r in range(rows):
        design = torch.stack([torch.ones(n, dtype=torch.float64), s[r]], dim=-1)
        sol = torch.linalg.lstsq(design, t[r].unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
        torch.testing.assert_close(b0[r], sol[0], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(b1[r], sol[1], rtol=1e-7, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(grouped_problems(min_group=1))
def test_property_diagnostics_do_not_change_loss_or_gradient(problem):
    shape, name, opts, seed = problem
    s, t = random_pair(shape, seed)
    target = torch.randn_like(t)
    objectives = [make_objective("kd", task_weight=0.5)] + [
        make_objective(name, weighting=weighting, w0=0.5, warmup=4, task_weight=0.5, **opts)
        for weighting in ("adaptive", "constant", "linear", "learnable")
    ]
    for obj in objectives:
        on = obj(s, t, step=1, target=target, diagnostics=True)
        (g_on,) = torch.autograd.grad(on.loss, s)
        off = obj(s, t, step=1, target=target, diagnostics=False)
        (g_off,) = torch.autograd.grad(off.loss, s)
        assert torch.equal(on.loss, off.loss)
        assert torch.equal(g_on, g_off)
        assert torch.isfinite(on.loss) and torch.isfinite(g_on).all()
