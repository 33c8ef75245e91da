"""The ablation table's statistics: the t-distribution fallback against known values."""
import math

from rils_scale.eval.stats import mean_std, paired_t_test, t_two_sided_p


def test_t_distribution_fallback_matches_known_values():
    # closed forms: df = 2 -> p = 1 - t / sqrt(t^2 + 2); df = 1 -> p = 1 - 2 atan(t) / pi
    for t in (0.3, 1.0, 2.0, 4.3, 12.0):
        assert abs(t_two_sided_p(t, 2) - (1 - t / math.sqrt(t * t + 2))) < 1e-12
        assert abs(t_two_sided_p(t, 1) - (1 - 2 * math.atan(t) / math.pi)) < 1e-12
    assert abs(t_two_sided_p(2.570581835636, 5) - 0.05) < 1e-9  # the tabulated 97.5 % quantile


def test_paired_t_test_and_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    r = paired_t_test([1.0, 2.0, 3.5], [0.5, 1.8, 2.0])
    d = [0.5, 0.2, 1.5]
    sd = math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    assert abs(r["t"] - (sum(d) / 3) / (sd / math.sqrt(3))) < 1e-12 and r["df"] == 2
    assert abs(r["p"] - (1 - r["t"] / math.sqrt(r["t"] ** 2 + 2))) < 1e-9
    assert math.isnan(paired_t_test([1.0, 2.0], [1.0, 2.0])["p"])  # no difference at all: undefined
