"""Settings that were accepted and then not applied (or applied wrongly): each is refused
before anything trains."""

import pytest

from liftplace.config import resolve
from liftplace.diffusion import NoiseProcess
from liftplace.preflight import check_inputs


def test_a_prediction_other_than_the_shipped_teachers_card_is_refused():
    with pytest.raises(ValueError, match=r"^teacher.prediction: 'v', but the teacher's .*card.json says it predicts "
                                         r"'epsilon': set teacher.prediction=epsilon$"):
        resolve("smoke", {"teacher.prediction": "v"})
    assert resolve("smoke", {"teacher.prediction": "epsilon"}).teacher.prediction == "epsilon"


@pytest.mark.parametrize("schedule", [{"beta_end": 1.5}, {"beta_start": -0.1}, {"beta_start": 0.0, "beta_end": 0.0}])
def test_betas_outside_zero_one_are_refused(schedule):
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        NoiseProcess("epsilon", 1000, schedule)
    NoiseProcess("epsilon", 1000, {"beta_start": 1e-4, "beta_end": 0.02})


def test_a_metrics_cache_that_is_a_file_is_refused_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LIFTPLACE_CACHE", str(blocker))
    with pytest.raises(ValueError, match=r"^LIFTPLACE_CACHE: the metrics cache .* is not a folder"):
        check_inputs([resolve("smoke")], log=lambda *_: None)
