"""Test-wide settings: offline (diffusers treats a missing path as a hub id: HF_HUB_OFFLINE), no
Ray token authentication (Ray 2.60 turns it on for new local clusters) and no usage stats."""

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# torch-fidelity's feature cache goes to a throwaway folder, not the user's cache.
os.environ.setdefault("LIFTPLACE_CACHE", tempfile.mkdtemp(prefix="liftplace-test-cache-"))
# The training loop's pause point (liftplace.distill._pause_point), for every process of the
# session, Ray's workers included (ensure_ray passes LIFTPLACE_* on): a test arms it by writing
# {"step": N} (or {"step": N, "fail": MESSAGE}) there, and must remove the file when done.
PAUSE_FILE = os.environ.setdefault("LIFTPLACE_PAUSE_FILE",
                                   os.path.join(tempfile.mkdtemp(prefix="liftplace-test-pause-"), "pause.json"))


@pytest.fixture
def pause_point():
    """Arm the training loop's pause point: arm(step), arm(step, fail=MESSAGE) or arm(step,
    fail=MESSAGE, errno=E) (step: a number, or "checks" / "trainer" before `liftplace distill`
    trains); returns the file's path. Arming again while paused releases the pause. Disarmed
    (the file removed) after the test."""
    import json
    import pathlib

    path = pathlib.Path(PAUSE_FILE)

    def arm(step: int | str, fail: str | None = None, errno: int | None = None) -> pathlib.Path:
        pathlib.Path(f"{path}.paused").unlink(missing_ok=True)
        armed = {"step": step, **({"fail": fail} if fail else {}), **({"errno": errno} if errno else {})}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(armed))
        tmp.replace(path)  # whole, so that a paused loop never reads half of it
        return path

    yield arm
    path.unlink(missing_ok=True)
    pathlib.Path(f"{path}.paused").unlink(missing_ok=True)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A 45k-parameter UNet teacher trained for 3 steps: enough to exercise every code path."""
    from liftplace.metrics import Protocol
    from liftplace.recipes import train_teacher

    out = tmp_path_factory.mktemp("teachers") / "unet-tiny"
    train_teacher(out, size="tiny", data="mnist", resolution=16, steps=3, batch=8,
                  protocol=Protocol(num_images=20, sampler_steps=2), progress=False, command="test")
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (two Ray clusters on one machine collide)."""
    import ray

    from liftplace.runner.cluster import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()
