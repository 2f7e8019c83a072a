"""FID/KID/precision/recall through torch-fidelity, the shipped extractor, the protocol."""

import numpy as np
import pytest
import scipy.linalg
import torch

from liftplace.data import load_dataset
from liftplace.metrics import (
    DEFAULT_EXTRACTOR_WEIGHTS,
    DigitsCNNExtractor,
    Protocol,
    compute_metrics,
    load_extractor,
    stack_dataset,
    to_uint8_rgb,
)
from liftplace.recipes import classifier_accuracy


@pytest.fixture(scope="module")
def val():
    images, labels = stack_dataset(load_dataset("mnist", 16, "val"))
    return images, labels


PROTOCOL = Protocol(num_images=500)


def test_extractor_classifies_held_out_digits(val):
    images, labels = val
    assert classifier_accuracy(load_extractor(DEFAULT_EXTRACTOR_WEIGHTS), images, labels) >= 0.96


def test_the_glyph_extractor_classifies_held_out_letters():
    from liftplace.metrics import SHIPPED_EXTRACTORS

    images, labels = stack_dataset(load_dataset("glyphs", 16, "val"))
    assert classifier_accuracy(load_extractor(SHIPPED_EXTRACTORS["glyphs"]), images, labels) >= 0.95
    assert Protocol(data="glyphs").weights_path() == str(SHIPPED_EXTRACTORS["glyphs"])
    assert Protocol(data="digits").weights_path() == str(DEFAULT_EXTRACTOR_WEIGHTS)  # no extractor of its own


def test_fid_small_between_real_halves_and_large_against_noise(val):
    images, _ = val
    halves = compute_metrics(images[:500], images[500:], PROTOCOL)
    noise = compute_metrics(torch.rand(500, 1, 16, 16) * 2 - 1, images[500:], PROTOCOL)
    blurred = compute_metrics(torch.nn.functional.avg_pool2d(images[:500], 3, 1, 1), images[500:], PROTOCOL)
    assert halves["fid"] < 0.1 * blurred["fid"] < 0.1 * noise["fid"]
    assert halves["kid"] < noise["kid"]
    assert halves["precision"] > 0.6 and halves["recall"] > 0.6
    assert noise["precision"] < 0.05


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_equals_an_independent_frechet_distance(val):
    images, _ = val
    fake = torch.nn.functional.avg_pool2d(images[:500], 3, 1, 1)
    real = images[500:]
    extractor = DigitsCNNExtractor("digits-cnn", ["features"]).eval()
    with torch.no_grad():
        f_fake = extractor(to_uint8_rgb(fake))[0].double().numpy()
        f_real = extractor(to_uint8_rgb(real))[0].double().numpy()
    ours = compute_metrics(fake, real, Protocol(num_images=500, prc=False))
    assert ours["fid"] == pytest.approx(frechet(f_fake, f_real), rel=1e-3)
    assert set(ours) == {"fid", "kid", "kid_std", "eval_reference_images"} and ours["eval_reference_images"] == 500


def test_reference_features_are_cached_by_key(val, tmp_path, monkeypatch):
    monkeypatch.setenv("LIFTPLACE_CACHE", str(tmp_path))
    images, _ = val
    first = compute_metrics(images[:200], images[500:700], Protocol(num_images=200, prc=False), real_cache_key="mnist-val-test")
    cached = sorted(tmp_path.rglob("*mnist-val-test*"))
    assert cached
    again = compute_metrics(images[:200], images[500:700], Protocol(num_images=200, prc=False), real_cache_key="mnist-val-test")
    assert again["fid"] == pytest.approx(first["fid"])
    assert sorted(tmp_path.rglob("*mnist-val-test*")) == cached  # the second call read the cache
    # Other images under the same key (a folder's validation images replaced): fresh statistics,
    # the FID of those images, not the cached set's.
    other = -images[500:700]
    replaced = compute_metrics(images[:200], other, Protocol(num_images=200, prc=False), real_cache_key="mnist-val-test")
    fresh = compute_metrics(images[:200], other, Protocol(num_images=200, prc=False))
    assert replaced["fid"] == pytest.approx(fresh["fid"]) and abs(replaced["fid"] - first["fid"]) > 1


def test_protocol_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="local weights file"):
        Protocol(extractor="inception-v3-compat")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        Protocol(extractor="inception-v3-compat", extractor_weights=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="clip"):
        Protocol(extractor="clip")
    with pytest.raises(ValueError, match="num_images"):
        Protocol(num_images=1)
    with pytest.raises(ValueError, match=">= 4 for precision and recall"):
        Protocol(num_images=3)
    assert Protocol(num_images=3, prc=False).num_images == 3


def test_a_validation_split_smaller_than_num_images_is_said_and_used_whole(val):
    from liftplace.config import resolve
    from liftplace.metrics import real_images
    from liftplace.preflight import check_inputs

    said = []
    config = resolve("smoke", {"data.spec": "digits", "eval.num_images": 1000})
    check_inputs([config, config], log=said.append)  # two runs of one study: said once
    assert len(said) == 1 and "digits has 300 validation images, fewer than eval.num_images=1,000" in said[0]
    digits_val = load_dataset("digits", 16, "val")
    assert len(real_images(digits_val, 1000)) == 300
    fake = val[0][:40]
    metrics = compute_metrics(fake, real_images(digits_val, 1000)[:20], Protocol(num_images=40, prc=False))
    assert metrics["eval_reference_images"] == 20 and np.isfinite(metrics["fid"])
