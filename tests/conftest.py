"""Test-wide settings: offline, no Ray token auth or usage stats (see PITFALLS.md)."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# torch-fidelity's feature cache goes to a throwaway folder, not the user's cache.
os.environ.setdefault("LIFTPLACE_CACHE", tempfile.mkdtemp(prefix="liftplace-test-cache-"))
