"""train.bootstrap: weighted AUROC/AUPRC equal the plain metrics on the resampled arrays, the
intervals are seeded, cover the estimate and shrink with more data."""
import numpy as np
import pytest

from train import bootstrap, metrics


def _data(n, k, seed, ties=False):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.3).astype(np.float64)
    s = rng.normal(size=(n, k)) + y
    if ties:
        s = np.round(s, 1)
    y[rng.random((n, k)) < 0.1] = np.nan
    return y, s


@pytest.mark.parametrize("ties", [False, True])
def test_point_equals_the_plain_metrics(ties):
    y, s = _data(300, 4, 1, ties)
    for k in range(4):
        assert bootstrap.point(y, s, "auroc")[k] == pytest.approx(metrics.auroc(y[:, k], s[:, k]), abs=1e-12)
        assert bootstrap.point(y, s, "auprc")[k] == pytest.approx(metrics.average_precision(y[:, k], s[:, k]),
                                                                   abs=1e-12)


@pytest.mark.parametrize("metric", ["auroc", "auprc"])
def test_each_replicate_is_the_metric_of_the_resampled_arrays(metric, monkeypatch):
    y, s = _data(120, 3, 2, ties=True)
    drawn = []
    real = bootstrap.resample_weights

    def spy(n, r, seed):
        w = real(n, r, seed)
        drawn.append(w)
        return w

    monkeypatch.setattr(bootstrap, "resample_weights", spy)
    reps = bootstrap.replicates(y, s, metric, resamples=5, seed=3)
    plain = metrics.auroc if metric == "auroc" else metrics.average_precision
    w = np.concatenate(drawn)
    for r in range(5):
        idx = np.repeat(np.arange(len(y)), w[r].astype(int))  # the resample as an array
        for k in range(3):
            assert reps[r, k] == pytest.approx(plain(y[idx, k], s[idx, k]), abs=1e-12, nan_ok=True)


def test_intervals_are_seeded_cover_the_estimate_and_shrink_with_n():
    y, s = _data(400, 3, 4)
    a_cls, a_mean = bootstrap.intervals(y, s, resamples=200, seed=7)
    b_cls, b_mean = bootstrap.intervals(y, s, resamples=200, seed=7)
    c_cls, _ = bootstrap.intervals(y, s, resamples=200, seed=8)
    assert a_cls == b_cls and a_mean == b_mean
    assert a_cls != c_cls
    for iv in a_cls + [a_mean]:
        assert iv.low <= iv.value <= iv.high
    big_y, big_s = _data(4000, 3, 4)
    big, _ = bootstrap.intervals(big_y, big_s, resamples=200, seed=7)
    assert all((b.high - b.low) < (a.high - a.low) for a, b in zip(a_cls, big))


def test_a_class_with_one_value_is_nan_and_left_out_of_the_mean():
    y, s = _data(200, 3, 5)
    y[:, 1] = 0.0
    cls, mean = bootstrap.intervals(y, s, resamples=50, seed=0)
    assert np.isnan(cls[1].value) and np.isnan(cls[1].low)
    assert mean.value == pytest.approx(np.mean([cls[0].value, cls[2].value]))


def test_nonfinite_scores_and_unknown_metric_are_errors():
    y, s = _data(50, 2, 6)
    s[3, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap.replicates(y, s)
    with pytest.raises(ValueError, match="metric"):
        bootstrap.replicates(y, np.zeros_like(s), "f1")
