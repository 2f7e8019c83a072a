"""The checks before Ray starts (liftplace/preflight.py), in-process and without Ray: a run's
CPUs and GPUs against what there is, and a training step's memory against what is free."""

import pytest

from liftplace import models, preflight
from liftplace.config import resolve


def smoke(teacher, **overrides):
    base = {"teacher.name": str(teacher), "student.prune_ratio": 0.5, "eval.num_images": 32,
            "eval.sampler_steps": 2, "train.steps": 10, "train.checkpoint_every": 5}
    return resolve("smoke", {**base, **overrides})


def test_a_run_the_cluster_cannot_place_is_refused():
    """Against a running cluster's capacity (passed in), this machine's GPUs before Ray starts,
    and nothing for a cluster still to join."""
    import torch

    gpus = resolve("smoke", {"scaling.use_gpu": True, "scaling.num_workers": 2})
    cpus = resolve("smoke", {"scaling.num_workers": 3, "scaling.cpus_per_worker": 1})
    with pytest.raises(ValueError, match=r"^scaling.use_gpu: a run asks for 2 GPUs \(2 workers x 1\); the Ray cluster has 1$"):
        preflight.check_resources([gpus], {"CPU": 8, "GPU": 1})
    with pytest.raises(ValueError, match=r"^scaling.num_workers: a run asks for 3.0 CPUs \(3 workers x 1.0\); the Ray cluster has 2$"):
        preflight.check_resources([cpus], {"CPU": 2, "GPU": 0})
    preflight.check_resources([gpus, cpus], {"CPU": 4, "GPU": 2})
    preflight.check_resources([gpus], None, "ray://head:10001")  # checked once joined
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="asks for 2 GPUs.*this machine has"):
            preflight.check_resources([gpus], None)
    preflight.check_resources([cpus], None)  # CPUs: the embedded Ray takes what it is given


def test_a_step_that_cannot_fit_in_memory_is_refused(tiny_teacher_dir, monkeypatch):
    """check_memory holds a step's estimate (preflight.step_memory times the margin, plus a worker
    process) against the available memory: first with the teacher standing in for the student
    (a bound), then, only where the bound does not fit, with the pruned student itself."""
    import psutil

    from liftplace.teachers import load_teacher

    monkeypatch.setattr(preflight, "_STEPS", {})  # estimates are kept per process
    config = smoke(tiny_teacher_dir, **{"train.batch": 1000, "student.prune_ratio": 0.9})
    teacher = load_teacher(str(tiny_teacher_dir))[0]
    shape = (1000, 1, 16, 16)
    bound = preflight.step_memory(teacher, shape) * preflight.STEP_MARGIN
    student = models.build_student(teacher, config.student, seed=0, example_shape=(2, 1, 16, 16))
    exact = preflight.step_memory(teacher, shape, student) * preflight.STEP_MARGIN
    assert 0 < exact < bound  # the 90%-pruned student keeps far fewer activations than the teacher would
    worker = preflight.WORKER_BASE_BYTES
    real = psutil.virtual_memory

    def available(nbytes):
        monkeypatch.setattr(psutil, "virtual_memory", lambda: real()._replace(available=int(nbytes + preflight.RAY_BASE_BYTES)))

    built = []
    monkeypatch.setattr(models, "build_student", lambda *a, **k: built.append(1) or student)
    available(3.5 * (worker + bound))
    assert preflight.check_memory([config], wanted=3) == 3 and not built  # the bound was enough
    available(worker + (exact + bound) / 2)
    assert preflight.check_memory([config]) == 1 and built  # the bound did not fit, the student did
    available(worker + 0.9 * exact)
    with pytest.raises(ValueError, match=r"^train\.batch: 1000 needs about .* GiB per worker"):
        preflight.check_memory([config])
    available(2.5 * (worker + exact))
    with pytest.raises(ValueError, match=r"^--max-concurrent: 3 trials at a time do not fit .* at most 2 fit"):
        preflight.check_memory([config], max_concurrent=3)
    # Two workers of one run need two worker processes and two steps.
    available(1.5 * (worker + exact))
    with pytest.raises(ValueError, match="2 workers with their processes and Ray's own need .* or scaling.num_workers"):
        preflight.check_memory([smoke(tiny_teacher_dir, **{"train.batch": 1000, "student.prune_ratio": 0.9,
                                                            "scaling.num_workers": 2})])
    # A GPU run: the step against each GPU's free memory (asked in a subprocess, patched here).
    gpu = smoke(tiny_teacher_dir, **{"train.batch": 1000, "student.prune_ratio": 0.9})
    gpu.scaling.use_gpu = True
    monkeypatch.setattr(preflight, "_gpu_free_bytes", lambda: [int(0.5 * exact)] * 8)
    with pytest.raises(ValueError, match="of GPU memory per worker.*GPUs have"):
        preflight.check_memory([gpu])
    monkeypatch.setattr(preflight, "_gpu_free_bytes", lambda: [int(1.5 * exact)] * 8)
    assert preflight.check_memory([gpu], wanted=8) == 8  # one trial per GPU, each GPU fits it
    gpu.scaling.gpus_per_worker = 0.25  # four workers could share a GPU, but memory holds one
    assert preflight.check_memory([gpu], wanted=8) == 8
    monkeypatch.setattr(preflight, "_gpu_free_bytes", lambda: [int(2.5 * exact)] * 8)
    assert preflight.check_memory([gpu], wanted=16) == 16  # two per GPU
    # A cohort trial holds its other students' weights, gradients, Adam moments and EMA too.
    available(worker + exact + 1)
    assert preflight.check_memory([config]) == 1
    weights = sum(p.numel() * p.element_size() for p in student.parameters())
    available(worker + exact + 9 * 5 * weights - 1)
    with pytest.raises(ValueError, match="train.batch"):
        preflight.check_memory([config], members=10)
    # A cluster still to join: nothing known, nothing estimated.
    assert preflight.check_memory([config], "ray://head:10001") is None
    # A running Ray: one worker's step against its largest node's "memory" resource (passed in);
    # how many trials run at once is its scheduler's to say.
    assert preflight.check_memory([config], node_memory=10 * (worker + bound)) is None
    with pytest.raises(ValueError, match=r"with its worker process that is .* GiB \(its Ray 'memory' resource\)"):
        preflight.check_memory([config], node_memory=worker + 0.9 * exact)
    assert preflight.check_memory([config], node_memory=0) is None  # no node says: not checked
    assert preflight.check_memory([gpu], node_memory=worker + 0.9 * exact) is None  # Ray reports no GPU memory
