"""Distillation objectives: task, KD, LIFT, PLACE, feature KD and PLACE + features, in the paper's notation.

Shapes: the student's and the teacher's final predictions ``s`` and ``t`` are [B, C, H, W]
(or [B, C, T] for tokens; any trailing dims are flattened). The teacher is never part of the
student's graph: callers pass it under ``torch.no_grad()`` and it is detached here again.

LIFT (linear fitting), inside each group of elements (default: one group per sample and
channel), fits the teacher on the student by least squares (``fit_lines``)::

    beta1 = cov(s, t) / (var(s) + eps)          beta0 = mean(t) - beta1 * mean(s)
    coarse = |beta0| + |beta1 - 1|                         ("l1"; "l2" squares both)
    fine   = mean((t - (beta0' + beta1' s))^2)            (' = detached)
    w      = 1 - min(1, mean_groups(|beta0| + |beta1 - 1|))   (no gradient)
    L      = coarse + w * fine

PLACE (piecewise local coefficients) sorts the elements of each (sample, channel) by
squared error (t - s)^2 (no gradient through the sort), cuts the sorted order into
consecutive groups of ``group_size`` elements (default ``PLACE_GROUP_SIZE`` = 16, the
authors' K) or into ``num_groups`` groups, and applies LIFT inside every group. One group
per channel is LIFT.

"moments" (this project's variant): coarse = mean((fit - s)^2) = (mean t - mean s)^2 +
(beta1 - 1)^2 var(s) and the fine term keeps beta's gradient. The residual of a least-squares
fit is orthogonal to 1 and s, so coarse + fine is exactly the output MSE when eps = 0: with
w = 1 it is vanilla KD in value and gradient, whatever the grouping.

cov and var are means over a group (the authors' code uses sums): eps then has the units of
the signal's variance whatever the group size, so a group-size ablation keeps one eps.

The feature term (FitNet; ``feat``, ``kd+feat``, ``place+feat``) matches the student's tapped
block outputs s_i [B, Cs_i, H_i, W_i] with the teacher's t_i [B, Ct_i, H_i, W_i] through 1x1
conv adapters A_i (the identity where the widths agree)::

    feat = reduce_i MSE(A_i(s_i), t_i)        reduce: mean over blocks ("mean") or sum ("sum")

``place+feat`` is the authors' "ours" of the DDPM table: task + PLACE + 1e-6 * feat with summed
blocks and bias-free adapters drawn uniformly in [-0.005, 0.005].
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

COARSE_FORMS = ("l1", "l2", "moments")
WEIGHTINGS = ("adaptive", "constant", "linear", "cosine", "step", "learnable")
GROUP_BY = ("channel", "sample")
REDUCTIONS = ("mean", "sum")
FEAT_INITS = ("default", "uniform")  # feature adapters: torch's Conv2d init, or uniform in +-feat_init_scale
PLACE_GROUP_SIZE = 16  # the authors' K: place's group size when neither group_size nor num_groups is given

_OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str):
    """Class decorator: make an objective constructible by ``make_objective(name)``."""

    def add(cls):
        _OBJECTIVES[name] = cls
        cls.name = name
        return cls

    return add


def objective_names() -> tuple[str, ...]:
    return tuple(_OBJECTIVES)


def objective_class(name: str) -> type[Objective]:
    """The class registered under ``name`` (read class flags such as ``needs_features`` here)."""
    if name not in _OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(_OBJECTIVES)}")
    return _OBJECTIVES[name]


def make_objective(name: str, **options) -> Objective:
    """Build an objective by name; every option is validated here, before any training.

    ``shape`` (optional) is one sample's prediction shape, e.g. (C, H, W): given, the grouping
    is checked against it at construction instead of at the first call.
    """
    return objective_class(name)(**options)


# Options the caller supplies from elsewhere than the objective's settings.
_CALLER_OPTIONS = frozenset({"shape", "student_channels", "teacher_channels"})


def _constructor_defaults(cls: type) -> dict[str, Any]:
    """Keyword-only parameters of ``cls``'s constructor with their defaults, following
    ``**kwargs`` up the MRO (a subclass's default wins over its base's)."""
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _CALLER_OPTIONS:
                defaults.setdefault(p.name, p.default)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return defaults


def _constructor_options(cls: type) -> set[str]:
    """Keyword-only parameters of ``cls``'s constructor, following ``**kwargs`` up the MRO."""
    return set(_constructor_defaults(cls))


def objective_defaults(name: str) -> dict[str, Any]:
    """Every option objective ``name`` takes, with its own default (from its constructor)."""
    return _constructor_defaults(objective_class(name))


def objective_options(name: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``settings`` (a flat mapping of every objective option, e.g. a config's
    objective section) that objective ``name``'s constructor takes, read from its signature.

    An entry that is None is left out: None means "the objective's own default", the
    constructor's keyword default (feat_weight is 1.0 for feat, 1e-6 for place+feat).
    ``shape``, ``student_channels`` and ``teacher_channels`` are never taken from settings:
    the caller passes them. Use: ``make_objective(name, **objective_options(name, settings), shape=...)``.
    """
    accepted = _constructor_options(objective_class(name))
    return {key: value for key, value in settings.items() if key in accepted and value is not None}


def group_length(name: str, settings: Mapping[str, Any], shape) -> int:
    """Elements per group of objective ``name`` (lift or place) with these options, for one
    sample's prediction shape ``shape`` = (C, *spatial).

    The group domain is one channel (group_by "channel": prod(spatial) elements) or the whole
    sample ("sample": C * prod(spatial)); it is cut into groups of group_size, into num_groups
    groups, or (neither given) into groups of place's default size, or kept whole for lift.
    Raises ValueError for an objective without groups or a grouping that does not divide.
    place+feat groups as place.
    """
    cls = objective_class(name)
    if not issubclass(cls, Lift):
        raise ValueError(f"objective {name!r} fits no lines, so it has no groups; lift and place have")
    line = Place if issubclass(cls, Place) else Lift  # place+feat groups as place does
    obj = line(**objective_options(line.name, settings))
    shape = tuple(shape)
    obj.check_shape(shape)
    return _group_len(obj.domain_size(shape), obj.group_size, obj.num_groups)


@dataclass
class LossParts:
    """What an objective returns: the differentiable total and detached batch means to log.

    Parts an objective does not have are NaN (e.g. ``w`` for kd).
    """

    loss: Tensor
    coarse: Tensor
    fine: Tensor
    w: Tensor
    beta0: Tensor
    beta1: Tensor
    task: Tensor
    distill: Tensor
    feat: Tensor


def fit_lines(s: Tensor, t: Tensor, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Least-squares line t ~ beta0 + beta1 * s over the last dimension.

    s, t: [..., n] -> beta0, beta1: [...]. Differentiable in s (and t); with eps = 0 it is
    the ordinary least-squares solution of [1, s] @ [beta0, beta1] = t.
    """
    s_mean = s.mean(-1, keepdim=True)
    t_mean = t.mean(-1, keepdim=True)
    ds = s - s_mean
    var = (ds * ds).mean(-1)
    cov = (ds * (t - t_mean)).mean(-1)
    beta1 = cov / (var + eps)
    beta0 = t_mean.squeeze(-1) - beta1 * s_mean.squeeze(-1)
    return beta0, beta1


class _LineTerms(torch.autograd.Function):
    """LIFT's coarse and fine terms with a closed-form backward.

    s, t: [B, D, N] group domains; order: [B, D, N] indices ranking each domain by error, or
    None to keep it in place; n: elements per group. Returns (coarse, fine, beta0, beta1):
    the two reduced terms (differentiable in s) and the per-group fit [B, D, N // n] (not
    differentiable; for the weight and the logs).

    The values are those of ``group_elements``, ``fit_lines`` and the residual under
    autograd, which takes some twenty full-size passes and temporaries per step and made
    PLACE many times the cost of the MSE it refines. Here every element's gradient is
    k0 + c_r * r + c_ds * ds with per-group k0, c_r, c_ds: two passes and one scatter back
    to the unsorted order. Per group of n elements, with ds = s - mean s,
    r = t - beta0 - beta1 s and D = var + eps:

        d beta1 / d s_i = (r_i - beta1 ds_i) / (n D)
        d beta0 / d s_i = -beta1 / n - mean(s) * d beta1 / d s_i
        sum_i r_i = 0,   sum_i r_i s_i = n beta1 eps            (normal equations)

    "moments": coarse = mean_i u_i^2 with u = beta0 + (beta1 - 1) s, per group
    (mean t - mean s)^2 + (beta1 - 1)^2 var, and the fine term's beta keeps its gradient.
    """

    @staticmethod
    def forward(ctx, s, t, order, n: int, eps: float, coarse: str, reduction: str):
        dtype = torch.promote_types(s.dtype, t.dtype)
        grouped = (*s.shape[:-1], s.shape[-1] // n, n)
        if order is None:
            s_g, t_g = s.to(dtype).reshape(grouped), t.to(dtype).reshape(grouped)
            ds, r = s_g - s_g.mean(-1, keepdim=True), t_g - t_g.mean(-1, keepdim=True)
        else:
            s_g = torch.gather(s, -1, order).to(dtype).reshape(grouped)
            t_g = torch.gather(t, -1, order).to(dtype).reshape(grouped)
            ds, r = s_g, t_g  # fresh tensors: centred in place below
        ms, mt = s_g.mean(-1, keepdim=True), t_g.mean(-1, keepdim=True)
        if order is not None:
            ds.sub_(ms)
            r.sub_(mt)
        # One scratch tensor for the three products: a fresh tensor of this size costs about
        # as much as the arithmetic on it.
        prod = torch.mul(ds, ds)
        var = prod.mean(-1, keepdim=True)
        cov = torch.mul(ds, r, out=prod).mean(-1, keepdim=True)
        denom = var + eps
        b1 = cov / denom
        b0 = mt - b1 * ms
        # The residual from centred values: the same line, with fewer roundings than t - fit.
        r.addcmul_(ds, b1, value=-1)
        groups = b1.numel()
        if coarse == "l1":
            per_group = b0.abs() + (b1 - 1).abs()
        elif coarse == "l2":
            per_group = b0.square() + (b1 - 1).square()
        else:
            per_group = (mt - ms).square() + (b1 - 1).square() * var  # mean of u^2 over the group
        # "mean": coarse over groups (over elements for moments: the same, groups being equal),
        # fine over elements; "sum": both summed.
        if reduction == "mean":
            c_scale, f_scale = 1.0 / groups, 1.0 / (groups * n)
        else:
            c_scale, f_scale = (float(n) if coarse == "moments" else 1.0), 1.0
        coarse_r = per_group.sum() * c_scale
        fine_r = torch.mul(r, r, out=prod).sum() * f_scale
        del prod
        ctx.save_for_backward(ds, r, ms, mt, var, denom, b0, b1, order)
        ctx.consts = (eps, coarse, c_scale, f_scale, n, s.dtype)
        b0, b1 = b0.squeeze(-1), b1.squeeze(-1)
        ctx.mark_non_differentiable(b0, b1)
        return coarse_r, fine_r, b0, b1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_coarse, g_fine, _g_b0, _g_b1):
        ds, r, ms, mt, var, denom, b0, b1, order = ctx.saved_tensors
        eps, coarse, c_scale, f_scale, n, s_dtype = ctx.consts
        gc, gf = g_coarse * c_scale, g_fine * f_scale
        # g_b0, g_b1: gradients of the total with respect to each group's beta0 and beta1;
        # k0, c_r, c_ds start as the parts of each element's gradient that hold beta fixed.
        k0 = torch.zeros_like(b1)
        c_r = -2 * gf * b1
        c_ds = torch.zeros_like(b1)
        if coarse == "l1":
            g_b0, g_b1 = gc * b0.sign(), gc * (b1 - 1).sign()
        elif coarse == "l2":
            g_b0, g_b1 = gc * 2 * b0, gc * 2 * (b1 - 1)
        else:
            # coarse = mean_i u_i^2: d/d beta0 = 2 mean u, d/d beta1 = 2 mean(u s); the fine
            # term's beta gradient is -2 sum_i r_i (1, s_i) = (0, -2 n beta1 eps).
            g_b0 = 2 * gc * (mt - ms)
            g_b1 = 2 * gc * ((b1 - 1) * var + ms * (mt - ms)) - 2 * gf * n * b1 * eps
            # d/d s_i of u_i^2 / n with beta held fixed: 2 u_i (beta1 - 1) / n
            gm = 2 * gc / n
            k0 = gm * (b1 - 1) * (mt - ms)
            c_ds = gm * (b1 - 1).square()
        q = (g_b1 - g_b0 * ms) / (n * denom)
        k0 = k0 - g_b0 * b1 / n
        c_r = c_r + q
        c_ds = c_ds - q * b1
        grad = torch.addcmul(k0, r, c_r)
        grad.addcmul_(ds, c_ds)
        grad = grad.to(s_dtype).reshape(*grad.shape[:-2], -1)
        if order is not None:
            # order is a permutation of each domain: every element is written once
            grad = torch.empty_like(grad).scatter_(-1, order, grad)
        return grad, None, None, None, None, None, None


def _domain_view(x: Tensor, group_by: str) -> Tensor:
    """[B, C, *spatial] -> [B, D, N]: D group domains of N elements per sample."""
    if group_by == "channel":
        return x.reshape(x.shape[0], x.shape[1], -1)
    return x.reshape(x.shape[0], 1, -1)


def error_order(s: Tensor, t: Tensor) -> Tensor:
    """Indices that sort each row of [..., N] by squared error (t - s)^2, ascending.

    Ties break by position, so the order is deterministic. No gradient flows through it.
    On CPU the rows are sorted as packed int64 keys (error bits above the element index) by
    numpy, whose vectorised sort is several times faster than torch's CPU sort here (see
    benchmarks/objectives.py); on other devices torch.sort does the same job.
    """
    err = (t.detach() - s.detach()).float().square_()  # a new tensor: in-place is safe
    n = err.shape[-1]
    if err.device.type != "cpu":
        return torch.sort(err, dim=-1, stable=True).indices
    # A non-negative float's bit pattern orders like its value, so (bits << k) | index sorts
    # by error, then index. NaN errors sort last, as torch.sort puts them. Every step works in
    # place: a fresh tensor of this size costs as much as the arithmetic on it.
    keys = err.nan_to_num_(nan=math.inf).view(torch.int32).to(torch.int64)
    shift = max(1, (n - 1).bit_length())
    keys.bitwise_left_shift_(shift).bitwise_or_(torch.arange(n, dtype=torch.int64))
    keys.numpy().sort(axis=-1)
    return keys.bitwise_and_((1 << shift) - 1)


def group_elements(
    s: Tensor,
    t: Tensor,
    *,
    group_size: int | None = None,
    num_groups: int | None = None,
    group_by: str = "channel",
) -> tuple[Tensor, Tensor]:
    """Cut each group domain into equal groups of elements ranked by error.

    s, t: [B, C, *spatial] -> [B, D, G, n], with D = C (group_by "channel") or 1 ("sample"),
    G groups of n elements each. With one group (G = 1) nothing is sorted: that is LIFT.
    One sort per domain and a reshape: no loop over samples, channels or groups.
    """
    s_d, t_d = _domain_view(s, group_by), _domain_view(t, group_by)
    n_total = s_d.shape[-1]
    n = _group_len(n_total, group_size, num_groups)
    if n < n_total:
        order = error_order(s_d, t_d)
        s_d = torch.gather(s_d, -1, order)
        t_d = torch.gather(t_d, -1, order)
    shape = (*s_d.shape[:2], n_total // n, n)
    return s_d.reshape(shape), t_d.reshape(shape)


def _group_len(n_total: int, group_size: int | None, num_groups: int | None) -> int:
    if group_size is not None:
        if n_total % group_size:
            raise ValueError(
                f"group_size {group_size} does not divide the {n_total} elements of a group domain"
            )
        return group_size
    if num_groups is not None:
        if n_total % num_groups:
            raise ValueError(
                f"num_groups {num_groups} does not divide the {n_total} elements of a group domain"
            )
        return n_total // num_groups
    return n_total


def _choice(option: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {option} {value!r}; choose one of {', '.join(choices)}")


def _nan(like: Tensor | None = None) -> Tensor:
    device = like.device if like is not None else None
    return torch.tensor(float("nan"), device=device)


class Objective(nn.Module):
    """Base: the task term, shape checks and the call signature every objective shares.

    ``objective(student, teacher, *, step, target=None, features=None) -> LossParts``.
    loss = task_weight * MSE(student, target) + distill_weight * (the objective's own term).
    An objective is an ``nn.Module`` so that its parameters (a learnable weight, feature
    adapters) can be handed to the optimiser and checkpointed with the student.
    """

    name = "objective"
    needs_teacher = True
    needs_features = False

    def __init__(self, *, task_weight: float = 1.0, distill_weight: float = 1.0, shape=None):
        super().__init__()
        for key, value in (("task_weight", task_weight), ("distill_weight", distill_weight)):
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}")
        self.task_weight = float(task_weight)
        self.distill_weight = float(distill_weight)
        if shape is not None:
            self.check_shape(tuple(shape))

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Refuse a per-sample prediction shape (C, H, W) this objective cannot group."""

    def distill_term(self, s: Tensor, t: Tensor, step: int, features) -> dict[str, Tensor]:
        """The objective's own term under "loss", plus detached parts to log (coarse, fine,
        w, beta0, beta1, feat) where it has them."""
        raise NotImplementedError

    def forward(self, student: Tensor, teacher: Tensor | None, *, step: int, target=None, features=None,
                diagnostics: bool = True):
        """diagnostics=False skips work done only for logging (the line fit of objectives that
        fit none, whose beta0/beta1 are then NaN); the loss and its gradient are the same."""
        if self.needs_teacher:
            if teacher is None:
                raise ValueError(f"objective {self.name!r} needs the teacher's prediction")
            if student.shape != teacher.shape:
                raise ValueError(
                    f"student and teacher predictions differ in shape: "
                    f"student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
                )
            teacher = teacher.detach()
        if self.task_weight > 0:
            if target is None:
                raise ValueError(f"objective {self.name!r} has task_weight > 0 but no target was given")
            task = F.mse_loss(student, target)
        else:
            task = student.new_zeros(())
        parts = self.distill_term(student, teacher, step, features) if self.distill_weight > 0 else {}
        distill = parts.pop("loss", student.new_zeros(()))
        loss = self.task_weight * task + self.distill_weight * distill
        if diagnostics and teacher is not None and "beta0" not in parts:
            # The fitted line is logged for every objective that sees the teacher: it shows
            # how far a plain-KD student sits from identity (the paper's Figure 2).
            with torch.no_grad():
                b0, b1 = fit_lines(_domain_view(student.float(), "channel"), _domain_view(teacher.float(), "channel"))
            parts.update(beta0=b0.mean(), beta1=b1.mean())
        logged = {k: parts.get(k, _nan(student)).detach() for k in ("coarse", "fine", "w", "beta0", "beta1", "feat")}
        return LossParts(loss=loss, task=task.detach(), distill=distill.detach(), **logged)


@register_objective("task")
class Task(Objective):
    """w/o KD: MSE(student, true target) only; the teacher is not needed."""

    needs_teacher = False

    def __init__(self, *, task_weight: float = 1.0, shape=None):
        if task_weight <= 0:
            raise ValueError(f"objective 'task' needs task_weight > 0, got {task_weight!r}")
        super().__init__(task_weight=task_weight, distill_weight=0.0, shape=shape)


@register_objective("kd")
class KD(Objective):
    """OutKD: MSE(student, teacher) per element, plus the task term."""

    def distill_term(self, s, t, step, features):
        return {"loss": F.mse_loss(s, t)}


class _Weighting(nn.Module):
    """The weight w of the fine term: adaptive, a fixed schedule over steps, or learnable."""

    def __init__(self, kind: str, w0: float, warmup: int):
        super().__init__()
        _choice("weighting", kind, WEIGHTINGS)
        if not (isinstance(w0, (int, float)) and 0.0 <= w0 <= 1.0):
            raise ValueError(f"w0 must be a number in [0, 1], got {w0!r}")
        if kind in ("linear", "cosine", "step") and not (isinstance(warmup, int) and warmup >= 1):
            raise ValueError(f"weighting {kind!r} needs warmup >= 1 steps, got {warmup!r}")
        self.kind, self.w0, self.warmup = kind, float(w0), warmup
        if kind == "learnable":
            # sigmoid(logit) = w0 at the start; clamped so that w0 in {0, 1} stays finite.
            p = min(max(self.w0, 1e-3), 1 - 1e-3)
            self.logit = nn.Parameter(torch.tensor(math.log(p / (1 - p))))

    def forward(self, step: int, distance: Tensor) -> Tensor:
        """distance: mean over groups of |beta0| + |beta1 - 1| (detached)."""
        if self.kind == "adaptive":
            return 1.0 - distance.clamp(max=1.0)
        if self.kind == "learnable":
            return torch.sigmoid(self.logit)
        if self.kind == "constant":
            w = self.w0
        else:
            x = min(1.0, max(0.0, step / self.warmup))
            w = {"linear": x, "cosine": 0.5 * (1.0 - math.cos(math.pi * x)), "step": float(step >= self.warmup)}[self.kind]
        return distance.new_tensor(w)


@register_objective("lift")
class Lift(Objective):
    """LIFT: one least-squares line per group domain, (sample, channel) or whole sample.
    Shapes: s, t [B, C, *spatial].

    Options: coarse (l1 | l2 | moments), group_by (channel | sample), eps, reduction
    (mean | sum), weighting (adaptive | constant | linear | cosine | step | learnable) with
    w0 and warmup. group_size / num_groups must stay None: they are place's options.

    The maths is written for groups of any size (``group_size``/``num_groups`` attributes,
    None here: one group per domain), so that Place only has to choose the grouping.
    """

    def __init__(
        self,
        *,
        coarse: str = "l1",
        group_size: int | None = None,
        num_groups: int | None = None,
        group_by: str = "channel",
        eps: float = 1e-4,
        reduction: str = "mean",
        weighting: str = "adaptive",
        w0: float = 1.0,
        warmup: int = 1000,
        task_weight: float = 1.0,
        distill_weight: float = 1.0,
        shape=None,
    ):
        _choice("coarse", coarse, COARSE_FORMS)
        _choice("group_by", group_by, GROUP_BY)
        _choice("reduction", reduction, REDUCTIONS)
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
        self.coarse, self.group_by, self.eps, self.reduction = coarse, group_by, float(eps), reduction
        self.group_size, self.num_groups = self._grouping(group_size, num_groups, group_by)
        super().__init__(task_weight=task_weight, distill_weight=distill_weight, shape=shape)
        self.weighting = _Weighting(weighting, w0, warmup)

    @staticmethod
    def _grouping(group_size, num_groups, group_by) -> tuple[int | None, int | None]:
        """(group_size, num_groups) to use; both None is one group per domain."""
        # A config may hold these as None for every objective, so only a value is an error.
        for key, value in (("group_size", group_size), ("num_groups", num_groups)):
            if value is not None:
                raise ValueError(f"lift fits one group per {group_by}; {key} is a place option (got {key}={value})")
        return None, None

    def domain_size(self, shape: tuple[int, ...]) -> int:
        """Elements in one group domain for a per-sample prediction shape (C, *spatial)."""
        return math.prod(shape[1:]) if self.group_by == "channel" else math.prod(shape)

    def check_shape(self, shape):
        try:
            _group_len(self.domain_size(shape), self.group_size, self.num_groups)
        except ValueError as err:
            raise ValueError(f"{err} (prediction shape {shape}, group_by {self.group_by!r})") from None

    def distill_term(self, s, t, step, features):
        # group_elements' grouping, with the gather inside _LineTerms so that its backward
        # scatters the gradient straight back
        s_d, t_d = _domain_view(s, self.group_by), _domain_view(t, self.group_by)
        n = _group_len(s_d.shape[-1], self.group_size, self.num_groups)
        order = error_order(s_d, t_d) if n < s_d.shape[-1] else None
        coarse, fine, beta0, beta1 = _LineTerms.apply(s_d, t_d, order, n, self.eps, self.coarse, self.reduction)
        # w always uses the l1 distance (as the authors do), whatever the coarse form.
        w = self.weighting(step, (beta0.abs() + (beta1 - 1).abs()).mean())
        return {"loss": coarse + w * fine, "coarse": coarse, "fine": fine, "w": w,
                "beta0": beta0.mean(), "beta1": beta1.mean()}


@register_objective("place")
class Place(Lift):
    """PLACE: LIFT inside groups of elements ranked by error. Shapes: s, t [B, C, *spatial].

    Lift's options, plus group_size or num_groups (not both; neither = groups of
    PLACE_GROUP_SIZE). One group per domain (num_groups=1) is LIFT.
    """

    @staticmethod
    def _grouping(group_size, num_groups, group_by):
        if group_size is not None and num_groups is not None:
            raise ValueError(f"give group_size or num_groups, not both (got {group_size} and {num_groups})")
        if group_size is None and num_groups is None:
            group_size = PLACE_GROUP_SIZE
        for key, value in (("group_size", group_size), ("num_groups", num_groups)):
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        return group_size, num_groups


class _FeatureTerm:
    """The feature term of feat, kd+feat and place+feat (a mixin for Objective subclasses).

    feat = reduce_i MSE(A_i(s_i), t_i) over the tapped blocks i, with s_i [B, Cs_i, H_i, W_i]
    the student's and t_i [B, Ct_i, H_i, W_i] the teacher's block outputs (detached) and A_i a
    1x1 conv from Cs_i to Ct_i channels (the identity where Cs_i = Ct_i, whatever the options).
    Options: feat_weight (its weight), feat_reduction (over blocks: mean | sum), feat_bias (the
    adapters' bias), feat_init ("default": torch's Conv2d init; "uniform": weights, and a bias
    if any, drawn uniformly in [-feat_init_scale, feat_init_scale]), feat_init_scale.
    The adapters are the objective's parameters: the trainer optimises them with the student.
    """

    def _init_feature_term(self, student_channels, teacher_channels, *, feat_weight, feat_reduction, feat_bias,
                           feat_init, feat_init_scale) -> None:
        """Check the options and build ``self.adapters``; call after nn.Module.__init__."""
        student_channels, teacher_channels = list(student_channels), list(teacher_channels)
        if not student_channels or len(student_channels) != len(teacher_channels):
            raise ValueError(
                f"objective {self.name!r} needs student_channels and teacher_channels of one length "
                f"(FeatureTaps.channels()), got {student_channels} and {teacher_channels}"
            )
        if not (isinstance(feat_weight, (int, float)) and feat_weight >= 0 and math.isfinite(feat_weight)):
            raise ValueError(f"feat_weight must be a finite number >= 0, got {feat_weight!r}")
        _choice("feat_reduction", feat_reduction, REDUCTIONS)
        if not isinstance(feat_bias, bool):
            raise ValueError(f"feat_bias must be true or false, got {feat_bias!r}")
        _choice("feat_init", feat_init, FEAT_INITS)
        if not (isinstance(feat_init_scale, (int, float)) and feat_init_scale > 0 and math.isfinite(feat_init_scale)):
            raise ValueError(f"feat_init_scale must be a finite number > 0, got {feat_init_scale!r}")
        self.feat_weight, self.feat_reduction = float(feat_weight), feat_reduction
        self.feat_bias, self.feat_init, self.feat_init_scale = feat_bias, feat_init, float(feat_init_scale)
        self.adapters = nn.ModuleList(self._adapter(a, b) for a, b in zip(student_channels, teacher_channels))

    def _adapter(self, student_width: int, teacher_width: int) -> nn.Module:
        if student_width == teacher_width:
            return nn.Identity()
        conv = nn.Conv2d(student_width, teacher_width, kernel_size=1, bias=self.feat_bias)
        if self.feat_init == "uniform":
            for p in conv.parameters():
                nn.init.uniform_(p, -self.feat_init_scale, self.feat_init_scale)
        return conv

    def feature_loss(self, features) -> Tensor:
        """features = (student_features, teacher_features), two lists of [B, C_i, H_i, W_i] -> []."""
        if features is None:
            raise ValueError(f"objective {self.name!r} needs features=(student_features, teacher_features)")
        s_feats, t_feats = features
        if len(s_feats) != len(self.adapters) or len(t_feats) != len(self.adapters):
            raise ValueError(
                f"objective {self.name!r} was built for {len(self.adapters)} feature taps, "
                f"got {len(s_feats)} student and {len(t_feats)} teacher features"
            )
        losses = torch.stack([F.mse_loss(adapt(s), t.detach()) for adapt, s, t in zip(self.adapters, s_feats, t_feats)])
        return losses.mean() if self.feat_reduction == "mean" else losses.sum()


@register_objective("feat")
class FeatKD(_FeatureTerm, Objective):
    """FeatKD: MSE between matched block outputs, through 1x1 adapters where widths differ.

    student_channels / teacher_channels: the widths of the tapped blocks (``FeatureTaps.channels``).
    Called with ``features=(student_features, teacher_features)``, two lists of [B, C_i, H_i, W_i].
    distill = feat_weight * mean_i MSE(adapter_i(s_i), t_i) (+ the output MSE for "kd+feat").
    The feature term's options are _FeatureTerm's; the defaults here are this project's (mean
    over blocks, Conv2d adapters with bias and torch's init, feat_weight 1).
    """

    needs_features = True
    with_output_kd = False

    def __init__(self, *, student_channels=(), teacher_channels=(), feat_weight: float = 1.0,
                 feat_reduction: str = "mean", feat_bias: bool = True, feat_init: str = "default",
                 feat_init_scale: float = 0.005, task_weight: float = 1.0, distill_weight: float = 1.0, shape=None):
        super().__init__(task_weight=task_weight, distill_weight=distill_weight, shape=shape)
        self._init_feature_term(student_channels, teacher_channels, feat_weight=feat_weight,
                                feat_reduction=feat_reduction, feat_bias=feat_bias, feat_init=feat_init,
                                feat_init_scale=feat_init_scale)

    def distill_term(self, s, t, step, features):
        feat = self.feature_loss(features)
        loss = self.feat_weight * feat
        if self.with_output_kd:
            loss = loss + F.mse_loss(s, t)
        return {"loss": loss, "feat": feat}


@register_objective("kd+feat")
class KDFeat(FeatKD):
    """OutKD + FeatKD: MSE to the teacher's output plus feat_weight times the feature term."""

    with_output_kd = True


@register_objective("place+feat")
class PlaceFeat(_FeatureTerm, Place):
    """PLACE + FitNet features: the authors' "ours" for the DDPM (CelebA 64) table.

    Shapes: student / teacher predictions s, t [B, C, *spatial]; ``features=(s_feats, t_feats)``,
    two lists of block outputs s_i [B, Cs_i, H_i, W_i] and t_i [B, Ct_i, H_i, W_i]::

        loss = task_weight * MSE(s, target) + distill_weight * PLACE(s, t) + feat_weight * feat
        feat = sum_i MSE(A_i(s_i), t_i)               (feat_reduction "mean": mean over i)

    PLACE(s, t) is exactly the ``place`` objective's term, with all of its options (group_size,
    default PLACE_GROUP_SIZE = 16, the authors' K; num_groups, coarse, group_by, eps, reduction,
    weighting, w0, warmup); the feature term is _FeatureTerm's, with the authors' defaults:
    feat_weight 1e-6, summed over the tapped blocks, 1x1 adapters A_i without bias initialised
    uniformly in [-0.005, 0.005] (feat and kd+feat default to a mean, a bias and torch's init).
    feat_weight stands outside distill_weight, so the authors' lambda_kd (distill_weight) does not
    scale it; feat_weight = 0 leaves ``place`` exactly. Rows: loss_distill is the PLACE term,
    loss_feat the (unweighted) feature term, and coarse, fine, w, beta0, beta1 are PLACE's.
    """

    needs_features = True

    def __init__(self, *, student_channels=(), teacher_channels=(), feat_weight: float = 1e-6,
                 feat_reduction: str = "sum", feat_bias: bool = False, feat_init: str = "uniform",
                 feat_init_scale: float = 0.005, **place_options):
        super().__init__(**place_options)
        self._init_feature_term(student_channels, teacher_channels, feat_weight=feat_weight,
                                feat_reduction=feat_reduction, feat_bias=feat_bias, feat_init=feat_init,
                                feat_init_scale=feat_init_scale)

    def forward(self, student: Tensor, teacher: Tensor | None, *, step: int, target=None, features=None,
                diagnostics: bool = True):
        parts = super().forward(student, teacher, step=step, target=target, features=features,
                                diagnostics=diagnostics)
        if self.feat_weight > 0:
            feat = self.feature_loss(features)
            parts.loss = parts.loss + self.feat_weight * feat
        else:  # place exactly; the term is still logged
            with torch.no_grad():
                feat = self.feature_loss(features)
        parts.feat = feat.detach()
        return parts
