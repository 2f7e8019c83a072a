"""Tests for liftplace.models: builders, pruning, sizing, counts, predict and feature taps."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.distributed as dist
from diffusers import DiTTransformer2DModel, UNet2DModel
from diffusers.models.attention_processor import Attention
from torch.utils.flop_counter import FlopCounterMode

from liftplace.models import (
    UNET_SIZES,
    FeatureTaps,
    build_dit,
    build_unet,
    count_macs,
    count_params,
    fresh_student,
    predict,
    prune_student,
)

SHAPE = (2, 1, 16, 16)
REAL_SIZES = ["xs", "s", "m", "l"]


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return build_unet("tiny")


@pytest.fixture
def dit():
    torch.manual_seed(0)
    return build_dit("tiny")


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(SHAPE, generator=generator), torch.tensor([3, 750])


def test_named_unet_sizes_build_and_span_ten_x_in_parameters():
    counts = {size: count_params(build_unet(size)) for size in UNET_SIZES}
    real = [counts[size] for size in REAL_SIZES]
    assert real == sorted(real) and len(set(real)) == len(real)
    assert real[-1] / real[0] >= 8
    assert counts["tiny"] < real[0]


@pytest.mark.parametrize("resolution", [16, 32])
def test_real_size_runs_at_cpu_resolutions(resolution):
    model = build_unet("xs", resolution=resolution)
    x = torch.zeros(1, 1, resolution, resolution)
    assert predict(model, x, 10).shape == x.shape


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: build_unet("huge"), "unknown UNet size 'huge'"),
        (lambda: build_unet("m", resolution=18), "resolution must be a positive multiple of 4"),
        (lambda: build_unet("m", in_channels=0), "in_channels must be a positive integer"),
        (lambda: build_dit("xl"), "unknown DiT size 'xl'"),
        (lambda: build_dit("s", resolution=15), "multiple of the patch size 2"),
    ],
)
def test_builders_refuse_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_pruning_hits_its_ratio_and_leaves_the_teacher_alone(unet, batch, ratio, record_property):
    before = {name: value.clone() for name, value in unet.state_dict().items()}
    student = prune_student(unet, ratio)

    fraction = count_params(student) / count_params(unet)
    record_property(f"tiny_param_fraction_at_{ratio}", fraction)
    print(f"tiny UNet pruned {ratio}: {fraction:.4f} of the teacher's parameters")
    assert 0.6 * (1 - ratio) ** 2 < fraction < 1.6 * (1 - ratio) ** 2

    x, t = batch
    assert predict(student, x, t).shape == predict(unet, x, t).shape == x.shape
    after = unet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_pruned_fractions_match_the_documented_table():
    teacher = build_unet("m")
    documented = {0.5: 0.2527, 0.7: 0.0894, 0.875: 0.0168, 0.9: 0.0097}
    measured = {ratio: count_params(prune_student(teacher, ratio)) / count_params(teacher) for ratio in documented}
    print("m UNet pruned fractions:", {ratio: round(value, 4) for ratio, value in measured.items()})
    assert measured == pytest.approx(documented, abs=1e-4)


def test_ratio_zero_is_an_exact_copy(unet, batch):
    unet.eval()
    student = prune_student(unet, 0.0)
    x, t = batch
    with torch.no_grad():
        assert torch.allclose(predict(student, x, t), predict(unet, x, t), atol=1e-6)
    assert student is not unet and count_params(student) == count_params(unet)


def test_student_keeps_the_teachers_surviving_weights(unet):
    student = prune_student(unet, 0.5)
    # conv_out keeps its output (the image channel) and loses input channels: each kept
    # input slice must be one of the teacher's, in the teacher's order.
    teacher_w, student_w = unet.conv_out.weight, student.conv_out.weight
    assert student_w.shape[1] == teacher_w.shape[1] // 2
    kept = [
        next(i for i in range(teacher_w.shape[1]) if torch.equal(student_w[:, j], teacher_w[:, i]))
        for j in range(student_w.shape[1])
    ]
    assert kept == sorted(set(kept))
    assert torch.equal(student.conv_out.bias, unet.conv_out.bias)
    # conv_in keeps its single input channel and loses output channels, weights and biases alike.
    assert student.conv_in.in_channels == unet.conv_in.in_channels
    teacher_rows = {tuple(row.flatten().tolist()) for row in unet.conv_in.weight}
    assert all(tuple(row.flatten().tolist()) in teacher_rows for row in student.conv_in.weight)


def test_pruned_student_trains(unet, batch):
    student = prune_student(unet, 0.9)
    x, t = batch
    predict(student, x, t).square().mean().backward()
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_bad_prune_ratios_are_refused(unet, ratio):
    with pytest.raises(ValueError, match=r"prune ratio must be in \[0, 1\), got"):
        prune_student(unet, ratio)


def test_prune_refuses_other_models_and_unknown_importance(unet, dit):
    with pytest.raises(ValueError, match="supports UNet2DModel, UNet2DConditionModel and DiTTransformer2DModel teachers, got Linear"):
        prune_student(torch.nn.Linear(2, 2), 0.5)
    with pytest.raises(ValueError, match="unknown importance 'hessian'"):
        prune_student(unet, 0.5, importance="hessian")
    with pytest.raises(ValueError, match="taylor importance needs calibration data"):
        prune_student(unet, 0.5, importance="taylor")
    with pytest.raises(ValueError, match="unknown GroupNorm grouping 'half'"):
        prune_student(unet, 0.5, groups="half")
    with pytest.raises(ValueError, match="a DiT has none"):
        prune_student(dit, 0.5, groups="teacher")


@pytest.mark.parametrize(
    "teacher, ratio",
    [("unet-tiny", 0.5), ("unet-tiny", 0.25), ("unet-m", 0.016), ("dit-s", 0.5), ("dit-s", 0.1)],
)
def test_fresh_student_hits_its_parameter_ratio(teacher, ratio, batch):
    family, size = teacher.split("-")
    model = build_unet(size) if family == "unet" else build_dit(size)
    student = fresh_student(model, ratio)
    assert type(student) is type(model)
    assert abs(count_params(student) - ratio * count_params(model)) <= 0.1 * ratio * count_params(model)
    x, t = batch
    assert predict(student, x, t).shape == x.shape


def test_fresh_student_refuses_bad_and_unreachable_ratios(unet):
    for ratio in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"param_ratio must be in \(0, 1\]"):
            fresh_student(unet, ratio)
    with pytest.raises(ValueError, match="within 10%"):
        fresh_student(unet, 0.001)


def test_predict_shapes_for_both_backbones(unet, dit, batch):
    x, t = batch
    assert predict(unet, x, t).shape == x.shape
    assert predict(unet, x, 500).shape == x.shape
    assert predict(unet, x, t.float() + 0.5).shape == x.shape
    assert predict(dit, x, t).shape == x.shape
    assert predict(dit, x, t, torch.tensor([4, 9])).shape == x.shape
    assert predict(dit, x, 500).shape == x.shape


def test_predict_splits_dit_learned_sigma(batch):
    model = build_dit("tiny", learn_sigma=True).eval()
    x, t = batch
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        full = model(x, timestep=t, class_labels=labels).sample
        assert full.shape[1] == 2 * x.shape[1]
        assert torch.equal(predict(model, x, t, labels), full[:, : x.shape[1]])


def test_count_macs_shrinks_with_pruning(unet):
    teacher_macs = count_macs(unet, SHAPE)
    student_macs = count_macs(prune_student(unet, 0.5), SHAPE)
    assert 0 < student_macs < teacher_macs


def test_count_macs_includes_cpu_attention(dit):
    x, t = torch.zeros(1, 1, 16, 16), torch.zeros(1, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        predict(dit, x, t)
    tokens, hidden = (16 // 2) ** 2, dit.inner_dim
    # Per layer, q @ k^T and attn @ v each take tokens * tokens * hidden MACs.
    attention = len(dit.transformer_blocks) * 2 * tokens * tokens * hidden
    assert count_macs(dit, SHAPE) == counter.get_total_flops() // 2 + attention


def _check_taps(model, x, t, names):
    with FeatureTaps(model) as taps:
        assert taps.names == names
        channels = taps.channels()
        assert taps.features == []
        predict(model, x, t)
        first = taps.features
        assert len(first) == len(names)
        assert [f.shape[1] for f in first] == channels
        assert all(f.ndim == 4 and f.shape[0] == x.shape[0] for f in first)
        predict(model, x, t)
        assert len(taps.features) == len(names) and taps.features[0] is not first[0]
        taps.clear()
        assert taps.features == []
    predict(model, x, t)
    assert taps.features == []
    return channels


UNET_TAPS = ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]


def test_feature_taps_on_unet_dit_and_pruned_student(unet, dit, batch):
    x, t = batch
    assert _check_taps(unet, x, t, UNET_TAPS) == [8, 16, 16, 16, 8]
    assert _check_taps(dit, x, t, ["transformer_blocks.0", "transformer_blocks.1"]) == [16, 16]
    assert _check_taps(prune_student(unet, 0.5), x, t, UNET_TAPS) == [4, 8, 8, 8, 4]


def test_feature_taps_keep_the_graph_and_refuse_unknown_names(unet, batch):
    x, t = batch
    with FeatureTaps(unet, ["mid_block"]) as taps:
        predict(unet, x, t)
        taps.features[0].square().mean().backward()
    assert unet.mid_block.resnets[0].conv1.weight.grad is not None
    with pytest.raises(ValueError, match="no submodule named 'nope'"):
        FeatureTaps(unet, ["nope"])


def test_feature_taps_through_distributed_data_parallel(unet, batch, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(unet)
        x, t = batch
        assert _check_taps(wrapped, x, t, UNET_TAPS) == [8, 16, 16, 16, 8]
        predict(wrapped, x, t).square().mean().backward()
        assert unet.conv_in.weight.grad is not None
        assert count_params(wrapped) == count_params(unet)
        assert count_params(prune_student(wrapped, 0.5)) < count_params(unet)
        assert isinstance(fresh_student(wrapped, 0.5), UNet2DModel)
    finally:
        dist.destroy_process_group()


def test_dit_builder_is_class_conditional():
    model = build_dit("s", num_classes=7)
    assert isinstance(model, DiTTransformer2DModel)
    assert model.config.num_embeds_ada_norm == 7
    assert model.out_channels == model.config.in_channels == 1


def test_pruning_a_frozen_teacher_still_prunes():
    # Teachers are loaded with requires_grad False for distillation; pruning must not care.
    teacher = build_unet("tiny").requires_grad_(False)
    student = prune_student(teacher, 0.5)
    assert count_params(student) < 0.4 * count_params(teacher)
    assert not any(p.requires_grad for p in student.parameters())


@pytest.mark.parametrize("channels, teacher_groups, least, expected", [
    (4, 8, 1, 4), (12, 8, 1, 4), (9, 8, 1, 1),  # 1: the gcd, as every measured preset's student
    (4, 8, 3, 1), (8, 8, 3, 2), (16, 8, 3, 4), (12, 8, 3, 4), (6, 8, 3, 2), (2, 8, 3, 1), (1, 8, 3, 1), (9, 8, 3, 1),
])
def test_student_group_counts(channels, teacher_groups, least, expected):
    from liftplace.models import student_groups

    groups = student_groups(channels, teacher_groups, least)
    assert groups == expected
    assert channels % groups == 0 and groups <= teacher_groups
    assert channels // groups >= min(least, channels)


def test_min_group_channels_keeps_groups_wide_enough_and_changes_nothing_else():
    from torch import nn

    torch.manual_seed(0)
    teacher = build_unet("xs")  # 90% pruned, the gcd rule leaves norms of 4 channels in 4 groups
    narrow, wide = (prune_student(teacher, 0.9, min_group_channels=k) for k in (1, 3))
    norms = [(a, b) for a, b in zip(narrow.modules(), wide.modules()) if isinstance(a, nn.GroupNorm)]
    assert any(a.num_channels // a.num_groups == 1 and a.num_channels > 1 for a, _ in norms)
    for a, b in norms:
        assert a.num_channels == b.num_channels  # the same channels are kept
        assert b.num_channels // b.num_groups >= min(3, b.num_channels)
    assert all(torch.equal(p, q) for p, q in zip(narrow.parameters(), wide.parameters()))
    x, t = torch.randn(SHAPE), torch.tensor([10, 500])
    assert predict(wide, x, t).shape == SHAPE


# --- transformer students: heads and MLP units (torch-pruning), and depth -----------------------

def _rows(student_w, teacher_w):
    """Indices of the teacher's rows that the student's rows are (exact copies), in order."""
    return [next(i for i in range(len(teacher_w)) if torch.equal(row, teacher_w[i])) for row in student_w]


def test_a_pruned_dit_is_its_teacher_without_the_pruned_heads_and_mlp_units():
    import copy

    from liftplace.models import build_dit, keep_blocks, predict, prune_student

    torch.manual_seed(0)
    teacher = build_dit("s", in_channels=1, resolution=16, num_classes=10).eval()
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([3, 400, 990]), torch.tensor([1, 5, 9])
    same = prune_student(teacher, 0.0, example_shape=(2, 1, 16, 16)).eval()
    assert torch.equal(predict(same, x, t, y), predict(teacher, x, t, y))  # ratio 0: an exact copy
    student = prune_student(teacher, 0.5, example_shape=(2, 1, 16, 16)).eval()
    masked = copy.deepcopy(teacher)
    with torch.no_grad():
        for s_block, m_block in zip(student.transformer_blocks, masked.transformer_blocks):
            s_attn, m_attn = s_block.attn1, m_block.attn1
            head = m_attn.inner_dim // m_attn.heads
            assert s_attn.heads == 2 and s_attn.to_q.out_features == 2 * head  # whole heads, 4 -> 2
            kept = {name: _rows(getattr(s_attn, name).weight, getattr(m_attn, name).weight)
                    for name in ("to_q", "to_k", "to_v")}
            assert kept["to_q"] == kept["to_k"] == kept["to_v"]  # the same heads of q, k and v
            heads = sorted({i // head for i in kept["to_q"]})
            assert kept["to_q"] == [h * head + j for h in heads for j in range(head)]
            assert torch.equal(s_attn.to_out[0].weight, m_attn.to_out[0].weight[:, kept["to_q"]])
            # the teacher with the removed heads' values and the removed MLP units zeroed
            gone = [i for i in range(m_attn.inner_dim) if i not in kept["to_q"]]
            m_attn.to_v.weight[gone] = 0
            m_attn.to_v.bias[gone] = 0
            proj = m_block.ff.net[0].proj
            units = _rows(s_block.ff.net[0].proj.weight, proj.weight)
            assert len(units) == proj.out_features // 2
            assert torch.equal(s_block.ff.net[2].weight, m_block.ff.net[2].weight[:, units])
            dropped = [i for i in range(proj.out_features) if i not in units]
            proj.weight[dropped] = 0
            proj.bias[dropped] = 0
    torch.testing.assert_close(predict(student, x, t, y), predict(masked, x, t, y), rtol=1e-5, atol=1e-5)
    # depth: blocks evenly spaced from the first to the last, their weights untouched
    shallow = keep_blocks(teacher, 2)
    assert len(shallow.transformer_blocks) == 2 and shallow.config.num_layers == 2
    for mine, theirs in zip(shallow.transformer_blocks, [teacher.transformer_blocks[0], teacher.transformer_blocks[3]]):
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
    with pytest.raises(ValueError, match=r"depth must be an integer in \[1, 4\]"):
        keep_blocks(teacher, 5)


def test_student_depth_is_a_dit_option_checked_before_training(tmp_path):
    from liftplace.config import resolve
    from liftplace.models import build_student, count_params, keep_blocks, prune_student
    from liftplace.teachers import load_teacher

    config = resolve("smoke", {"teacher.name": "dit-s", "student.prune_ratio": 0.9, "student.depth": 2})
    teacher, _ = load_teacher("dit-s")
    student = build_student(teacher, config.student, seed=0, example_shape=(2, 1, 16, 16))
    # the shares docs/own-model.md states: heads and MLP alone, with depth, one block
    assert len(student.transformer_blocks) == 2 and round(count_params(student) / count_params(teacher), 2) == 0.30
    share = {}
    for ratio, depth in ((0.5, None), (0.9, None), (0.0, 2), (0.9, 1)):
        source = keep_blocks(teacher, depth) if depth else teacher
        share[ratio, depth] = round(count_params(prune_student(source, ratio, example_shape=(2, 1, 16, 16)))
                                    / count_params(teacher), 2)
    assert share == {(0.5, None): 0.75, (0.9, None): 0.57, (0.0, 2): 0.51, (0.9, 1): 0.16}
    for overrides, message in (
            ({"teacher.name": "unet-xs", "student.depth": 2}, "student.depth: depth pruning needs a DiT or SD3 teacher"),
            ({"teacher.name": "dit-s", "student.depth": 5}, "student.depth: 5 is more than the teacher's 4 transformer blocks"),
            ({"teacher.name": "dit-s", "student.depth": 0}, "student.depth: must be an integer >= 1"),
            ({"teacher.name": "dit-s", "student.depth": 2, "objective.name": "kd+feat"},
             "student.depth: objective kd\\+feat matches the student's blocks with the teacher's one by one"),
            ({"teacher.name": "dit-s", "student.depth": 2, "student.prune_ratio": None, "student.param_ratio": 0.5},
             "student.depth: depth pruning keeps the teacher's weights")):
        with pytest.raises(ValueError, match=message):
            resolve("smoke", overrides)


# --- the authors' students (Diff-Pruning): the teacher's GroupNorm groups, Taylor importance, dropout ---

def _calibration(seed=3, count=16):
    from liftplace.diffusion import make_process
    from liftplace.models import Calibration

    images = torch.rand(count, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return Calibration(images, make_process())


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _norms(model):
    from torch import nn

    return {name: (m.num_channels, m.num_groups) for name, m in model.named_modules() if isinstance(m, nn.GroupNorm)}


def test_teacher_grouping_keeps_every_groupnorm_and_one_channel_per_group(unet, batch):
    """groups="teacher" at 0.9: every norm keeps its teacher group count, with one channel per group
    (two in the up blocks' first norms, over the concatenation of two such layers), and the same
    positions survive in every group; at ratio 0.9 the tiny teacher's 8- and 16-channel layers
    (2 and 4 channels per group) would keep none per group and torch-pruning would leave them whole."""
    student = prune_student(unet, 0.9, groups="teacher")
    teacher_norms, norms = _norms(unet), _norms(student)
    assert norms.keys() == teacher_norms.keys()
    for name, (channels, groups) in norms.items():
        assert groups == teacher_norms[name][1] == 4
        concat = name.startswith("up_blocks.") and name.endswith(".norm1")
        assert channels == (2 if concat else 1) * groups, name
    # conv_in (8 channels, 2 per group): one kept per group, at the same position in each
    size = unet.conv_in.out_channels // 4
    kept = [next(i for i in range(unet.conv_in.out_channels) if torch.equal(row, unet.conv_in.weight[i]))
            for row in student.conv_in.weight]
    assert [i // size for i in kept] == [0, 1, 2, 3] and len({i % size for i in kept}) == 1
    x, t = batch
    assert predict(student, x, t).shape == predict(unet, x, t).shape == x.shape
    predict(student, x, t).square().mean().backward()  # it trains
    assert all(p.grad is not None for p in student.parameters())


def test_taylor_importance_is_deterministic_uses_the_data_and_leaves_the_teacher_alone(unet):
    before = {name: value.clone() for name, value in unet.state_dict().items()}
    calibration = _calibration()
    built = []
    for global_seed in (0, 1):  # the calibration draws from its own generator, not from torch's
        torch.manual_seed(global_seed)
        built.append(prune_student(unet, 0.9, groups="teacher", importance="taylor", calibration=calibration,
                                   taylor_batches=1))
    taylor, again = built
    assert _same(taylor, again)
    magnitude = prune_student(unet, 0.9, groups="teacher")
    assert _norms(taylor) == _norms(magnitude) and count_params(taylor) == count_params(magnitude)
    assert not _same(taylor, magnitude)  # the same shapes, other channels
    other = prune_student(unet, 0.9, groups="teacher", importance="taylor", calibration=_calibration(seed=4),
                          taylor_batches=1)
    assert not _same(taylor, other)  # other calibration images, other channels
    # the gradients stay in the pruned copy and go with it
    assert all(p.grad is None for p in unet.parameters()) and all(p.grad is None for p in taylor.parameters())
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # Taylor with today's grouping: today's shapes
    gcd = prune_student(unet, 0.9, importance="taylor", calibration=calibration, taylor_batches=1)
    assert _norms(gcd) == _norms(prune_student(unet, 0.9))


def test_default_student_settings_give_todays_student_and_dropout_sets_every_resnet_block(unet):
    from diffusers.models.resnet import ResnetBlock2D

    from liftplace.config import StudentConfig
    from liftplace.models import build_student

    teacher = unet
    today = prune_student(teacher, 0.9)
    default = build_student(teacher, StudentConfig(), seed=0, example_shape=SHAPE)
    spelled = prune_student(teacher, 0.9, importance="magnitude", min_group_channels=1, groups="gcd",
                            calibration=_calibration(), taylor_batches=4)  # unused by magnitude
    for student in (default, spelled):
        assert _same(student, today) and _norms(student) == _norms(today)
    resnets = [m for m in default.modules() if isinstance(m, ResnetBlock2D)]
    assert resnets and all(m.dropout.p == 0.0 for m in resnets)

    dropped = build_student(teacher, StudentConfig(dropout=0.1), seed=0, example_shape=SHAPE)
    blocks = [m for m in dropped.modules() if isinstance(m, ResnetBlock2D)]
    assert len(blocks) == len(resnets) and all(m.dropout.p == 0.1 for m in blocks)
    assert _same(dropped, today)  # dropout changes no weight
    dropped.train()
    x, t = torch.randn(SHAPE), torch.tensor([10, 500])
    assert not torch.equal(predict(dropped, x, t), predict(dropped, x, t))  # active in train mode
    fresh = build_student(teacher, StudentConfig(prune_ratio=None, param_ratio=0.5, dropout=0.1), seed=0,
                          example_shape=SHAPE)
    assert all(m.dropout.p == 0.1 for m in fresh.modules() if isinstance(m, ResnetBlock2D))
    with pytest.raises(ValueError, match="student.dropout sets a UNet's ResNet blocks' dropout"):
        build_student(build_dit("tiny"), StudentConfig(prune_ratio=0.5, dropout=0.1), seed=0, example_shape=SHAPE)


def test_teacher_grouping_of_unet_m_at_ninety_percent_matches_the_docstring():
    """unet-m at 0.9: 8 channels in 8 groups (16 in 8 over a concatenation), where gcd's student has
    3 or 6 channels in 3-channel groups; 22,453 parameters (2.02% of the teacher)."""
    torch.manual_seed(0)
    teacher = build_unet("m")
    student = prune_student(teacher, 0.9, groups="teacher")
    assert count_params(student) == 22_453
    assert set(_norms(student).values()) == {(8, 8), (16, 8)}
    assert predict(student, torch.randn(SHAPE), torch.tensor([3, 900])).shape == SHAPE
    heads = [a.heads for a in student.modules() if isinstance(a, Attention)]
    assert heads and all(h == 1 for h in heads) and student.mid_block.attentions[0].to_q.out_features == 6


@pytest.mark.parametrize("overrides, message", [
    ({"student.groups": "half"}, r"^student.groups: unknown grouping 'half'; choose one of gcd, teacher$"),
    ({"student.importance": "hessian"}, r"^student.importance: unknown importance 'hessian'; choose one of .*taylor"),
    ({"student.taylor_batches": 0}, r"^student.taylor_batches: must be an integer >= 1, got 0$"),
    ({"student.dropout": 1.0}, r"^student.dropout: must be in \[0, 1\), got 1.0$"),
    ({"student.groups": "teacher", "student.min_group_channels": 3}, r"^student.min_group_channels: applies to"),
    ({"teacher.name": "dit-s", "student.groups": "teacher"}, r"^student.groups: keeps a UNet's GroupNorm groups"),
    ({"teacher.name": "dit-s", "student.dropout": 0.1}, r"^student.dropout: sets a UNet's ResNet blocks' dropout"),
])
def test_authors_student_settings_are_validated(overrides, message):
    from liftplace.config import resolve

    with pytest.raises(ValueError, match=message):
        resolve("smoke", overrides)


def test_configs_saved_before_the_authors_student_settings_still_compare_equal():
    from liftplace.checkpoints import config_digest
    from liftplace.config import comparable, resolve

    new = resolve("smoke").to_dict()
    old = {section: dict(values) if isinstance(values, dict) else values for section, values in new.items()}
    for key in ("groups", "taylor_batches", "dropout"):
        del old["student"][key]
    assert comparable(old) == comparable(new) and config_digest(old) == config_digest(new)
    authors = resolve("smoke", {"student.groups": "teacher", "student.importance": "taylor", "student.dropout": 0.1})
    assert config_digest(authors.to_dict()) != config_digest(new)


def test_a_run_and_load_student_build_the_same_taylor_student(tiny_teacher_dir, tmp_path, monkeypatch):
    """The student is rebuilt from the config alone: checkpoints.load_student prunes the teacher by
    the same calibration (the run's training split, its noise process, seed 0) as the run did."""
    from diffusers.models.resnet import ResnetBlock2D

    from liftplace import checkpoints, distill, models
    from liftplace.config import resolve

    settings = {"teacher.name": str(tiny_teacher_dir), "student.prune_ratio": 0.9, "student.groups": "teacher",
                "student.importance": "taylor", "student.taylor_batches": 1, "student.dropout": 0.1}
    trainee = distill.build({None: resolve("smoke", {**settings, "train.seed": 7})}).trainees[0]
    built = {k: v.clone() for k, v in trainee.student.state_dict().items()}
    checkpoints.save(tmp_path, 0, trainee.student, trainee.ema, trainee.opt, trainee.objective,
                     torch.Generator(), 0, 1)
    rebuilt = []  # the student load_student prunes, before the checkpoint's weights are loaded into it
    real = models.build_student

    def spy(*args, **kwargs):
        student = real(*args, **kwargs)
        rebuilt.append({k: v.clone() for k, v in student.state_dict().items()})
        return student

    monkeypatch.setattr(models, "build_student", spy)
    # another train.seed prunes the same student: the calibration's seed is its own
    student, teacher, _ = checkpoints.load_student(tmp_path, resolve("smoke", {**settings, "train.seed": 8}), ema=False)
    assert len(rebuilt) == 1 and rebuilt[0].keys() == built.keys()
    assert all(torch.equal(rebuilt[0][k], built[k]) for k in built)
    assert all(m.dropout.p == 0.1 for m in student.modules() if isinstance(m, ResnetBlock2D))
    assert all(p.grad is None for p in teacher.parameters())
