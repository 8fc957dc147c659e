import numpy as np
import pytest

from src.health import (
    EXPLODING,
    HEALTHY,
    VANISHING,
    Thresholds,
    Verdict,
    format_table,
    judge,
    judge_run,
    profile_columns,
)

LAYERS = ["fc1", "fc2", "fc3", "fc4"]


def test_judge_flat_profile_healthy():
    verdict = judge(LAYERS, np.full(4, 1e-3), Thresholds())
    assert verdict.network == HEALTHY
    assert verdict.layer_verdicts == [HEALTHY] * 4
    assert verdict.first_layer is None
    assert verdict.decay_per_layer == pytest.approx(1.0)


def test_judge_geometric_decay_vanishing():
    # Each layer towards the input gets a tenth of the next one's signal.
    rms = 1e-2 * 0.1 ** np.arange(3, -1, -1)  # fc1 1e-5 ... fc4 1e-2
    verdict = judge(LAYERS, rms, Thresholds())
    assert verdict.network == VANISHING
    assert verdict.layer_verdicts == [VANISHING, VANISHING, HEALTHY, HEALTHY]
    assert verdict.first_layer == "fc1"
    assert verdict.decay_per_layer == pytest.approx(0.1)
    np.testing.assert_allclose(verdict.ratios, [1e-3, 1e-2, 1e-1, 1.0])


def test_judge_geometric_growth_exploding():
    rms = 1e-2 * 10.0 ** np.arange(3, -1, -1)  # fc1 10 ... fc4 1e-2
    verdict = judge(LAYERS, rms, Thresholds())
    assert verdict.network == EXPLODING
    assert verdict.layer_verdicts == [EXPLODING, EXPLODING, HEALTHY, HEALTHY]
    assert verdict.first_layer == "fc1"


def test_judge_nan_exploding():
    verdict = judge(LAYERS, np.array([1e-3, np.nan, 1e-3, 1e-3]), Thresholds())
    assert verdict.network == EXPLODING
    assert verdict.first_layer == "fc2"


def test_judge_absolute_limits():
    thresholds = Thresholds(vanish_abs=1e-9, explode_abs=1.0)
    assert judge(LAYERS, np.full(4, 1e-12), thresholds).network == VANISHING
    assert judge(LAYERS, np.full(4, 5.0), thresholds).network == EXPLODING


def test_judge_exploding_outranks_vanishing():
    verdict = judge(LAYERS, np.array([1e-6, 1.0, 1e-3, 1e-3]), Thresholds())
    assert verdict.network == EXPLODING
    assert verdict.first_layer == "fc2"


def _epoch(verdicts: list[str]) -> Verdict:
    rms = np.array([1e-5 if v == VANISHING else 1e-3 for v in verdicts])
    return Verdict(HEALTHY, verdicts, None, rms, rms / rms[-1], 1.0)


def test_judge_run_needs_sustained_epochs():
    thresholds = Thresholds(min_epochs_frac=0.2)
    early = [_epoch([VANISHING, HEALTHY, HEALTHY, HEALTHY])] * 2
    late = [_epoch([HEALTHY] * 4)] * 8
    verdict = judge_run(LAYERS, early + late, thresholds)
    assert verdict.network == VANISHING
    assert verdict.first_layer == "fc1"
    np.testing.assert_allclose(verdict.vanishing_frac, [0.2, 0, 0, 0])

    brief = judge_run(LAYERS, early[:1] + late, thresholds)
    assert brief.network == HEALTHY


def test_judge_run_without_epochs():
    verdict = judge_run(LAYERS, [], Thresholds())
    assert verdict.network == HEALTHY
    assert np.isnan(verdict.rms).all()


def test_profile_columns_prefer_biases():
    names = ["fc1", "fc2", "fc1.bias", "fc2.bias"]
    assert profile_columns(names, ["fc1", "fc2"]) == ([2, 3], "bias")
    assert profile_columns(["fc1", "fc2", "fc1.bias"], ["fc1", "fc2"]) == ([0, 1], "weight")


def test_format_table_lists_layers():
    verdict = judge_run(LAYERS, [_epoch([VANISHING, HEALTHY, HEALTHY, HEALTHY])], Thresholds())
    table = format_table(LAYERS, verdict)
    assert table.splitlines()[0].split() == [
        "layer", "rms", "rms/last", "vanishing", "exploding", "verdict"
    ]  # fmt: skip
    assert "fc1" in table.splitlines()[1]
    assert table.splitlines()[-1].startswith("network: vanishing (first at fc1)")
