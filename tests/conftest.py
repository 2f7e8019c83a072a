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


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A 45k-parameter UNet teacher trained for 3 steps: enough to exercise every code path."""
    from liftplace.metrics import Protocol
    from liftplace.teachers import train_teacher

    out = tmp_path_factory.mktemp("teachers") / "unet-tiny"
    train_teacher(out, size="tiny", data="mnist", resolution=16, steps=3, batch=8,
                  protocol=Protocol(num_images=20, sampler_steps=2), progress=False, command="test")
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (two Ray clusters on one machine collide)."""
    import ray

    from liftplace.sweep import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()
