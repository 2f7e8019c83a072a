"""A run's checkpoint folder: the one module that writes, reads and checks it.

A checkpoint holds the student, its EMA, the optimizer, the objective's parameters (adapters,
a learnable weight), the step and every RNG state, as safetensors and weights-only torch
files (nothing is unpickled)::

    student.safetensors      the live weights (state_dict)
    ema.safetensors          the EMA weights, "p{i}" for the student's i-th parameter
    objective.safetensors    the objective's parameters ("_empty" when it has none)
    optimizer.pt             the optimizer's state_dict (rank 0)
    rng_rank{r}.pt           rank r's data/noise generator, torch's global and CUDA's RNG
    state.json               {"step", "world_size", "ema_optimization_step", "config_digest",
                             "teacher_fingerprint"}: written last

A cohort's checkpoint (several students trained on one stream) holds one such folder per
student that has not diverged (``m0``, ``m1``, ...) and ``cohort.json`` (written last)::

    cohort.json              {"step", "members": [{"variant", "folder", "diverged_at"}]}

Resuming from it continues the same run (on CPU, the same losses as an uninterrupted run). A
pruned student is rebuilt by pruning the teacher again -- pruning is deterministic -- and then
loaded, so no module is pickled.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from liftplace import files, models
from liftplace.teachers import load_teacher, teacher_process, teacher_space

STATE_FILE = "state.json"
MANIFEST = "cohort.json"
WEIGHT_FILES = ("student.safetensors", "ema.safetensors", "objective.safetensors")


def _rng_state(gen: torch.Generator) -> dict:
    """The run's RNG streams: data/noise (gen), torch's global one (DiT label dropout), CUDA's."""
    state = {"generator": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _tensors(named: dict) -> dict:
    return {k: v.contiguous() for k, v in named.items()}


def config_digest(config: dict) -> str:
    """SHA-256 of a resolved config (RunConfig.to_dict()), kept in every checkpoint so that a
    resume under another config is refused whatever a run folder's config.json says. Keys added
    since (config.ADDED_KEYS) count only where they change what runs, so older checkpoints match."""
    from liftplace.config import comparable

    return hashlib.sha256(json.dumps(comparable(config), sort_keys=True).encode()).hexdigest()


def _check_digest(directory: Path, state: dict, digest: str | None, teacher: str | None = None) -> None:
    """Refuse a checkpoint of another config, or of a teacher whose files changed since (a
    checkpoint written before teachers were fingerprinted is not checked for the latter)."""
    saved = state.get("config_digest")
    if digest is not None and saved is not None and saved != digest:
        raise ValueError(f"the checkpoint {directory} was trained under a different config than the one given "
                         f"(digest {saved[:12]} vs {digest[:12]}); resume with that run's own preset and --set values")
    saved = state.get("teacher_fingerprint")
    if teacher is not None and saved is not None and saved != teacher:
        raise ValueError(f"the checkpoint {directory} was trained with other teacher files than teacher.name has now "
                         f"(fingerprint {saved[:12]} vs {teacher[:12]}: its weights, config or scheduler config "
                         "changed since); resume with the teacher it was trained with")


def save(directory: Path, step: int, student, ema, opt, objective, gen: torch.Generator, rank: int, world: int,
         digest: str | None = None, teacher: str | None = None) -> None:
    """Write one checkpoint into directory, all files or none (``files.write_all``): a write
    that fails (a full disk, an error) leaves a checkpoint already there whole. Rank 0 writes
    the weights and the optimizer; every rank its own RNG state (its data stream is its own).
    ``digest``: config_digest of the run's config; ``teacher``: its teacher's
    ``teachers.teacher_fingerprint``."""
    writers = {}
    if rank == 0:
        writers["student.safetensors"] = lambda p: save_file(_tensors(student.state_dict()), str(p))
        writers["ema.safetensors"] = lambda p: save_file(_tensors({f"p{i}": v for i, v in enumerate(ema.shadow_params)}), str(p))
        writers["objective.safetensors"] = lambda p: save_file(_tensors(objective.state_dict()) or {"_empty": torch.zeros(1)}, str(p))
        writers["optimizer.pt"] = lambda p: torch.save(opt.state_dict(), p)
    writers[f"rng_rank{rank}.pt"] = lambda p: torch.save(_rng_state(gen), p)
    if rank == 0:
        state = {"step": step, "world_size": world, "ema_optimization_step": ema.optimization_step,
                 "config_digest": digest, "teacher_fingerprint": teacher}
        writers[STATE_FILE] = lambda p: p.write_text(json.dumps(state))
    files.write_all(directory, writers)


@contextmanager
def _reading(directory: Path, marker: str = STATE_FILE):
    """Read a checkpoint's files; a missing marker, a truncated or foreign file ends in one
    clear line naming the folder, not a stack of library errors."""
    if not (directory / marker).is_file():
        raise FileNotFoundError(f"not a liftplace checkpoint (no {marker}): {directory}")
    try:
        yield
    except Exception as err:
        raise ValueError(f"corrupt checkpoint {directory}: {type(err).__name__}: {' '.join(str(err).split())}") from err


def _ema_tensors(directory: Path, student) -> list[torch.Tensor]:
    """The EMA weights in the order of student.parameters(), on their devices."""
    shadow = load_file(str(directory / "ema.safetensors"))
    return [shadow[f"p{i}"].to(p.device) for i, p in enumerate(student.parameters())]


def save_manifest(directory: Path, step: int, members: list[tuple[str, str, int | None]]) -> None:
    """cohort.json, once every student's folder is written: (variant, folder, diverged_at) each."""
    manifest = {"step": step, "members": [{"variant": v, "folder": f, "diverged_at": d} for v, f, d in members]}
    files.write_text(Path(directory) / MANIFEST, json.dumps(manifest))


def read_manifest(directory: Path) -> dict:
    directory = Path(directory)
    with _reading(directory, MANIFEST):
        manifest = json.loads((directory / MANIFEST).read_text())
        manifest["step"], manifest["members"] = int(manifest["step"]), list(manifest["members"])
    return manifest


def check(directory: str | Path, digest: str | None = None, teacher: str | None = None) -> int:
    """Read every file of a checkpoint (a run's or a cohort's) without a model; returns its
    step. Refuses a missing or corrupt checkpoint, or (given the digest of the config a run is
    about to resume under) one trained under another config or (given ``teacher``, its teacher's
    fingerprint) with other teacher files, with one line, before a run starts."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        manifest = read_manifest(directory)
        for member in manifest["members"]:
            if member["diverged_at"] is None:
                check(directory / member["folder"], teacher=teacher)  # members' configs differ; their teacher not
        return manifest["step"]
    with _reading(directory):
        state = json.loads((directory / STATE_FILE).read_text())
        step = int(state["step"])
        for name in WEIGHT_FILES:
            load_file(str(directory / name))
        for path in [directory / "optimizer.pt", *sorted(directory.glob("rng_rank*.pt"))]:
            torch.load(path, weights_only=True)
    _check_digest(directory, state, digest, teacher)
    return step


def restore(directory: Path, student, ema, opt, objective, gen: torch.Generator, rank: int,
            digest: str | None = None, teacher: str | None = None) -> int:
    """Load a run's state into its live objects; returns the step the checkpoint was taken at.
    A checkpoint of another config (``digest``) or teacher (``teacher``) is refused."""
    directory = Path(directory)
    with _reading(directory):
        state = json.loads((directory / STATE_FILE).read_text())
    _check_digest(directory, state, digest, teacher)
    with _reading(directory):
        student.load_state_dict(load_file(str(directory / "student.safetensors")))
        ema.shadow_params = _ema_tensors(directory, student)
        ema.optimization_step = state["ema_optimization_step"]
        objective_state = load_file(str(directory / "objective.safetensors"))
        objective_state.pop("_empty", None)
        objective.load_state_dict(objective_state)
        opt.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        rng_file = directory / f"rng_rank{rank}.pt"
        rng = torch.load(rng_file if rng_file.is_file() else directory / "rng_rank0.pt", weights_only=True)
    gen.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return int(state["step"])


def load_student(directory: str | Path, config, *, ema: bool = True, device="cpu"):
    """A finished run's student, in eval mode, from one of its checkpoints (for analysis).

    Returns (student, teacher, process): the student rebuilt as the run built it with the
    checkpoint's EMA weights (ema=True, what evaluations sample from) or its live weights; the
    frozen teacher; the run's noise process. ``config`` is the run's RunConfig.
    """
    from liftplace import storage

    # A checkpoint on a store (a URI): copied to this machine's cache once.
    directory = storage.input_copy(str(directory), "checkpoint") if storage.is_uri(directory) else Path(directory)
    teacher, _ = load_teacher(config.teacher.name, "cpu")
    space = teacher_space(config.teacher.name)  # a latent teacher's denoiser is smaller than the images
    size = space.size or config.data.resolution
    shape = (2, space.channels, size, size)
    if not (directory / "student.safetensors").is_file():  # before the (slow) pruning
        raise FileNotFoundError(f"not a liftplace checkpoint (no student.safetensors): {directory}")
    process = teacher_process(config.teacher.name, config.teacher.prediction)
    calibration = None
    if config.student.prune_ratio is not None and config.student.importance in models.NEEDS_DATA:
        # Taylor importance prunes by the run's training split, loaded (encoded) as the run loaded it
        from liftplace import latents
        from liftplace.teachers import load_vae

        split = latents.load_split(config, "train", space, load_vae(space, "cpu"), log=lambda *_: None)
        calibration = models.Calibration.of(split, process)
    student = models.build_student(teacher, config.student, seed=config.train.seed, example_shape=shape,
                                   calibration=calibration)
    with _reading(directory, "student.safetensors"):
        student.load_state_dict(load_file(str(directory / "student.safetensors")))
        if ema:
            with torch.no_grad():
                for p, shadow in zip(student.parameters(), _ema_tensors(directory, student)):
                    p.copy_(shadow)
    for net in (student, teacher):
        net.requires_grad_(False).eval().to(device)
    return student, teacher, process
