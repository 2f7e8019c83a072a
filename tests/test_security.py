"""What the package loads and what it exposes: no unpickling of files, no open dashboard."""

import os
import re
from pathlib import Path

import pytest
import torch

from liftplace.metrics import Protocol, private_cache_root

PACKAGE = Path(__file__).resolve().parents[1] / "liftplace"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def calls(source: str, name: str):
    """The text of every call to name(...), parentheses balanced."""
    for match in re.finditer(re.escape(name) + r"\(", source):
        depth, i = 1, match.end()
        while depth and i < len(source):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        yield source[match.start():i]


def test_every_torch_load_is_weights_only():
    loads = [(p.name, call) for p in SOURCES for call in calls(p.read_text(), "torch.load")]
    assert loads, "no torch.load found: the scan is broken"
    assert [(name, call) for name, call in loads if "weights_only=True" not in call] == []


def test_no_pickle_and_no_dashboard_on_all_interfaces():
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(pickle|cloudpickle|dill|joblib)\b", text, re.M), path
        assert "pickle.load" not in text and "weights_only=False" not in text, path
        assert "0.0.0.0" not in text and "dashboard_host" not in text, path


def test_inception_weights_that_are_not_plain_tensors_are_refused_unread(tmp_path):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "weights-inception.pth"
    torch.save({"fc.weight": Payload()}, bad)
    with pytest.raises(ValueError, match="refused.*can run code"):
        Protocol(extractor="inception-v3-compat", extractor_weights=str(bad))
    assert not marker.exists()
    good = tmp_path / "tensors.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, good)
    Protocol(extractor="inception-v3-compat", extractor_weights=str(good))


def test_a_metrics_cache_others_can_write_to_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFTPLACE_CACHE", str(tmp_path / "cache"))
    root = private_cache_root()
    assert root.stat().st_mode & 0o777 == 0o700
    os.chmod(root, 0o777)
    with pytest.raises(ValueError, match="writable by another user"):
        private_cache_root()
