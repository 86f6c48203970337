"""The reproduction protocol's statistics and verdict rules
(experiments/reproduction_rules.py): intervals computed by hand, their
coverage on simulated experiments, the bootstrap over whole seeds, and every
verdict branch."""
import numpy as np
import pytest
from scipy import stats

from experiments import reproduction_rules as rules

T_975 = {2: 12.706205, 3: 4.302653, 5: 2.776445}  # t(0.975, n-1), from a t table


def interval(estimate, low, high, n=3):
  return rules.Interval(estimate, low, high, n)


# --- intervals over seeds -----------------------------------------------------


def test_t_quantile_for_three_and_five_seeds():
  assert rules.t_quantile(3) == pytest.approx(T_975[3], abs=1e-6)
  assert rules.t_quantile(5) == pytest.approx(T_975[5], abs=1e-6)
  assert rules.t_quantile(2) == pytest.approx(T_975[2], abs=1e-6)


def test_difference_by_hand_for_three_seeds():
  # d = (2, 3, 4): mean 3, sample variance 1, so the half-width is
  # 4.302653 * sqrt(1/3) = 2.484138.
  d = rules.difference([3, 5, 7], [1, 2, 3])
  assert (d.estimate, d.n) == (3.0, 3)
  assert d.low == pytest.approx(3 - 2.484138, abs=1e-5)
  assert d.high == pytest.approx(3 + 2.484138, abs=1e-5)
  # v_test adds to var/n undivided: 4.302653 * sqrt(1/3 + 0.25) = 3.286213.
  d = rules.difference([3, 5, 7], [1, 2, 3], test_variance=0.25)
  assert (d.low, d.high) == pytest.approx((3 - 3.286213, 3 + 3.286213), abs=1e-5)


def test_difference_by_hand_for_five_seeds():
  # d = (1, ..., 5): mean 3, sample variance 2.5; 2.776445 * sqrt(0.5) = 1.963243.
  d = rules.difference([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
  assert (d.low, d.high) == pytest.approx((3 - 1.963243, 3 + 1.963243), abs=1e-5)
  assert d.n == 5


def test_difference_needs_paired_finite_values_and_one_seed_has_no_interval():
  with pytest.raises(ValueError, match='equal-length'):
    rules.difference([1, 2, 3], [1, 2])
  with pytest.raises(ValueError, match='last finite value'):
    rules.difference([1, np.nan], [1, 2])
  one = rules.difference([0.9], [0.8])
  assert one.estimate == pytest.approx(0.1) and np.isnan(one.low) and np.isnan(one.high)


def test_ratio_is_the_difference_of_log_ratios_exponentiated():
  # log-ratios (ln 2, ln 4): mean 1.5 ln 2, sample sd ln2/sqrt(2), so the
  # interval is 2^(1.5 -+ 12.706205 / 2).
  r = rules.ratio([4, 8], [2, 2])
  assert r.estimate == pytest.approx(2 ** 1.5)
  assert r.low == pytest.approx(2 ** (1.5 - T_975[2] / 2), rel=1e-5)
  assert r.high == pytest.approx(2 ** (1.5 + T_975[2] / 2), rel=1e-5)
  with pytest.raises(ValueError, match='positive'):
    rules.ratio([1, 0], [1, 1])


def test_accuracy_test_variance_by_hand():
  # p_A = mean(0.90, 0.92) = 0.91, p_B = 0.80 on 10,000 images:
  # (0.91 * 0.09 + 0.8 * 0.2) / 10,000 = 2.419e-5.
  assert rules.accuracy_test_variance([0.90, 0.92], [0.8, 0.8], 10_000) == \
      pytest.approx(2.419e-5)


def test_perplexity_variance_by_hand():
  # Blocks (1, 2, 3): L = 2, var(l)/K = 1/3, Var(exp L) = e^4 / 3.
  assert rules.mean_loss_variance([1, 2, 3]) == pytest.approx(1 / 3)
  assert rules.perplexity_variance([1, 2, 3]) == pytest.approx(np.exp(4) / 3)
  # Per-seed losses are averaged over seeds block by block first.
  assert rules.perplexity_variance([[0, 2, 2], [2, 2, 4]]) == \
      pytest.approx(np.exp(4) / 3)
  # Blocks (2, 2, 5): L = 3, sample variance 3, var(l)/K = 1.
  assert rules.perplexity_test_variance([1, 2, 3], [2, 2, 5]) == \
      pytest.approx(np.exp(4) / 3 + np.exp(6))
  # The log-ratio of perplexities is L_A - L_B: no exp.
  assert rules.perplexity_test_variance([1, 2, 3], [2, 2, 5], log=True) == \
      pytest.approx(1 / 3 + 1)


def test_perplexity_variance_matches_simulated_test_sets():
  # 4,000 validation splits of 400 blocks with losses N(4, 0.5^2): the
  # variance of their perplexities against the delta method's, e^8 0.25/400.
  rng = np.random.default_rng(0)
  blocks = rng.normal(4.0, 0.5, size=(4000, 400))
  empirical = np.var(np.exp(blocks.mean(axis=1)), ddof=1)
  assert empirical == pytest.approx(np.exp(8) * 0.25 / 400, rel=0.06)
  estimated = np.mean([rules.perplexity_variance(b) for b in blocks[:200]])
  assert estimated == pytest.approx(empirical, rel=0.1)


def test_interval_covers_the_true_difference_95_percent_of_the_time():
  # 2,000 simulated 3-seed experiments, normal seed noise, true difference 1:
  # the t interval is exact here, so the coverage is 0.95 up to binomial
  # noise (sd 0.005).
  rng = np.random.default_rng(1)
  covered = []
  for _ in range(2000):
    a = 1 + rng.normal(0, 1, 3)
    d = rules.difference(a, np.zeros(3))
    covered.append(d.low <= 1 <= d.high)
  assert np.mean(covered) == pytest.approx(0.95, abs=0.015)


def test_test_variance_keeps_the_coverage_when_the_test_set_is_shared():
  # 5 seeds evaluated on one test set: the test set adds one error common to
  # every seed (variance 1), which the spread over seeds cannot see. With
  # v_test the interval covers at least 95% (the t quantile applied to the
  # known v_test makes it conservative); without it, far less.
  rng = np.random.default_rng(2)
  with_v, without_v = [], []
  for _ in range(2000):
    a = 1 + rng.normal(0, 1, 5) + rng.normal(0, 1)
    d = rules.difference(a, np.zeros(5), test_variance=1.0)
    with_v.append(d.low <= 1 <= d.high)
    d = rules.difference(a, np.zeros(5))
    without_v.append(d.low <= 1 <= d.high)
  assert np.mean(with_v) >= 0.95
  assert np.mean(without_v) < 0.8


# --- dose-response ------------------------------------------------------------


def test_weighted_statistics_equal_those_of_copied_runs():
  rng = np.random.default_rng(3)
  x = np.repeat([0.0, 1.0, 2.0, 3.0], 3)  # dose levels, tied
  y = np.round(rng.normal(size=12), 1)    # values with some ties
  for _ in range(5):
    w = rng.integers(0, 4, size=12)
    w[0] = max(w[0], 1)
    w[-1] = max(w[-1], 1)  # two dose levels present
    xs, ys = np.repeat(x, w), np.repeat(y, w)
    assert rules.weighted_slope(x, y, w[None])[0] == pytest.approx(
        np.polyfit(xs, ys, 1)[0])
    assert rules.weighted_spearman(x, y, w[None])[0] == pytest.approx(
        stats.spearmanr(xs, ys).statistic)
  # One dose level only: no slope, no correlation.
  w = np.zeros(12)
  w[:3] = 1
  assert np.isnan(rules.weighted_slope(x, y, w[None])[0])
  assert np.isnan(rules.weighted_spearman(x, y, w[None])[0])


def test_bootstrap_draws_whole_seeds():
  seeds = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
  w = rules.seed_bootstrap_weights(seeds, 1000, np.random.default_rng(0))
  assert w.shape == (1000, 9)
  assert np.all(w[:, 0] == w[:, 1]) and np.all(w[:, 3] == w[:, 5])  # runs of a seed
  assert np.all(w.sum(axis=1) == 9)  # three seeds drawn, three runs each
  assert w.mean() == pytest.approx(1.0, abs=0.05)


def test_bootstrap_resamples_seeds_not_points():
  # Seed 0 lies exactly on y = x, seed 1 on y = 3x. Resampling whole seeds
  # gives slope 1 ({0, 0}), 2 ({0, 1}) or 3 ({1, 1}) and nothing else, so the
  # interval is [1, 3]; resampling points gives slopes outside it.
  x = np.array([1.0, 2, 3, 4])
  doses, values = np.tile(x, 2), np.concatenate([x, 3 * x])
  seeds = np.repeat([0, 1], 4)
  w = rules.seed_bootstrap_weights(seeds, 2000, np.random.default_rng(0))
  assert set(np.round(rules.weighted_slope(doses, values, w), 12)) == {1.0, 2.0, 3.0}
  result = rules.dose_response(doses, values, seeds)
  assert (result.slope.estimate, result.slope.low, result.slope.high) == \
      pytest.approx((2.0, 1.0, 3.0))
  assert result.spearman.high == pytest.approx(1.0)  # one seed alone: monotone
  assert (result.n_runs, result.slope.n) == (8, 2)
  rng = np.random.default_rng(0)
  points = rng.multinomial(8, np.full(8, 1 / 8), size=2000)
  point_slopes = rules.weighted_slope(doses, values, points)
  assert np.nanquantile(point_slopes, 0.025) < 1.0 or \
      np.nanquantile(point_slopes, 0.975) > 3.0


def test_three_seeds_with_one_design_give_the_range_of_the_seeds_slopes():
  # With 3 seeds, a resample draws one seed three times with probability
  # 1/27 > 2.5%, and a pooled slope over seeds of equal design is the mean of
  # their slopes: the interval runs from the smallest seed's slope to the
  # largest's.
  x = np.array([0.0, 1, 2, 3])
  doses = np.tile(x, 3)
  values = np.concatenate([0.5 * x, 2 * x + 1, 1.2 * x - 3])
  result = rules.dose_response(doses, values, np.repeat([4, 7, 9], 4))
  assert (result.slope.low, result.slope.estimate, result.slope.high) == \
      pytest.approx((0.5, (0.5 + 2 + 1.2) / 3, 2.0))


def test_dose_response_is_deterministic_given_the_rng_seed():
  rng = np.random.default_rng(4)
  doses = np.tile([0.0, 0.1, 0.5, 2.0], 5)
  seeds = np.repeat(np.arange(5), 4)
  values = -doses + rng.normal(0, 0.5, 20) + rng.normal(0, 0.5, 5)[seeds]
  first = rules.dose_response(doses, values, seeds, n_boot=2000, rng_seed=7)
  assert rules.dose_response(doses, values, seeds, n_boot=2000, rng_seed=7) == first
  other = rules.dose_response(doses, values, seeds, n_boot=2000, rng_seed=8)
  assert other.slope.estimate == first.slope.estimate  # the data's own fit
  assert other != first                                # other resamples


def test_dose_response_transform_and_groups():
  doses = np.array([0.01, 0.1, 1.0, 0.01, 0.1, 1.0])
  values = np.array([1.0, 2.0, 3.0, 1.5, 2.5, 3.5])
  seeds = np.array([0, 0, 0, 1, 1, 1])
  logged = rules.dose_response(doses, values, seeds, transform=np.log10, n_boot=200)
  assert logged.slope.estimate == pytest.approx(1.0)  # one per decade
  plain = rules.dose_response(doses, values, seeds, n_boot=200)
  assert plain.spearman.estimate == logged.spearman.estimate  # ranks only
  assert plain.slope.estimate != pytest.approx(1.0)
  # Within-group slopes 1 and 3, equal weights: 2, where the pooled fit is not.
  x = np.array([0.0, 1, 10, 11, 0, 1, 10, 11])
  y = np.array([0.0, 1, 30, 33, 0, 1, 30, 33])
  width = np.array([50, 50, 100, 100, 50, 50, 100, 100])
  grouped = rules.dose_response(x, y, np.repeat([0, 1], 4), groups=width, n_boot=200)
  assert grouped.slope.estimate == pytest.approx(2.0)
  assert np.polyfit(x, y, 1)[0] > 2.5
  with pytest.raises(ValueError, match='one entry per run'):
    rules.dose_response([1, 2], [1, 2, 3], [0, 0, 0])


def test_partial_spearman_removes_the_confounder():
  # Accuracy driven by width alone, h correlated with width: the rank
  # correlation of accuracy and h is high, the partial one given width ~0.
  rng = np.random.default_rng(5)
  width = rng.normal(size=400)
  h = width + 0.5 * rng.normal(size=400)
  accuracy = width + 0.5 * rng.normal(size=400)
  assert stats.spearmanr(h, accuracy).statistic > 0.6
  assert abs(rules.partial_spearman(accuracy, h, width)) < 0.1
  # By hand: x = (1, 2, 3, 4), y = (2, 1, 3, 4), z = (1, 2, 4, 3) have
  # r_xy = r_xz = 0.8 (one swap: 1 - 6*2/60) and r_yz = 0.6 (1 - 6*4/60), so
  # (0.8 - 0.8 * 0.6) / sqrt(0.36 * 0.64) = 0.32 / 0.48 = 2/3.
  assert rules.partial_spearman([1, 2, 3, 4], [2, 1, 3, 4], [1, 2, 4, 3]) == \
      pytest.approx(2 / 3)


# --- verdicts -----------------------------------------------------------------


@pytest.mark.parametrize('low, high, estimate, side, size, expected', [
    (0.5, 1.5, 1.0, 1, None, 'reproduced'),
    (0.5, 3.0, 2.0, 1, 1.5, 'reproduced'),
    (0.5, 3.0, 1.0, 1, 1.5, 'trend reproduced'),
    (-0.5, 1.5, 0.5, 1, None, 'inconclusive'),
    (0.0, 1.0, 0.5, 1, None, 'inconclusive'),    # touching 0 is including it
    (-1.5, -0.5, -1.0, 1, None, 'not reproduced'),
    (-1.5, -0.5, -1.0, -1, None, 'reproduced'),
    (-3.0, -0.5, -1.0, -1, -2.0, 'trend reproduced'),
    (0.5, 1.5, 1.0, -1, None, 'not reproduced'),
])
def test_difference_rule_branches(low, high, estimate, side, size, expected):
  result = rules.verdict_difference(interval(estimate, low, high), 'EGR - plain',
                                    side=side, size=size, unit='points')
  assert result.verdict == expected
  assert result.why.startswith(f'EGR - plain: {estimate:+.3g} points ')


def test_difference_rule_names_the_numbers():
  why = rules.verdict_difference(interval(0.42, -0.1, 0.94), 'EGR - plain',
                                 unit='points').why
  assert why == ("EGR - plain: +0.42 points [-0.1, +0.94] (95%, 3 seeds); the "
                 "interval includes 0; the estimate is above it, on the paper's side")
  why = rules.verdict_difference(interval(-0.3, -0.9, 0.2), 'x', side=1).why
  assert "below it, against the paper's side" in why


def test_one_seed_is_inconclusive():
  result = rules.verdict_difference(rules.difference([0.9], [0.8]), 'd')
  assert result.verdict == 'inconclusive'
  assert 'no interval (95%, 1 seed)' in result.why and 'n = 1' in result.why


def test_ratio_rule_branches():
  assert rules.verdict_ratio(interval(2.4, 1.8, 3.1), 'NFE', size=2).verdict == \
      'reproduced'
  trend = rules.verdict_ratio(interval(1.5, 1.2, 1.9), 'NFE no JR / JR', size=2)
  assert trend == ('trend reproduced', "NFE no JR / JR: 1.5x [1.2x, 1.9x] (95%, 3 "
                   "seeds); the interval lies above 1, the paper's side, but the "
                   "estimate falls short of the paper's size 2")
  assert rules.verdict_ratio(interval(1.1, 0.8, 1.5), 'NFE', size=2).verdict == \
      'inconclusive'
  assert rules.verdict_ratio(interval(0.7, 0.6, 0.8), 'NFE', size=2).verdict == \
      'not reproduced'


def test_dose_response_rule():
  x = np.tile([0.0, 1, 2, 3], 3)
  seeds = np.repeat([0, 1, 2], 4)
  rising = rules.dose_response(x, x + np.array([0, 0.1, 0.2] * 4), seeds, n_boot=500)
  assert rules.verdict_dose_response(rising, 'accuracy', side=1).verdict == \
      'reproduced'
  assert rules.verdict_dose_response(rising, 'R_IG', side=-1).verdict == \
      'not reproduced'
  by_rank = rules.verdict_dose_response(rising, 'accuracy', statistic='spearman')
  assert by_rank.verdict == 'reproduced' and 'by the spearman' in by_rank.why
  flat = rules.DoseResponse(interval(0.1, -0.2, 0.4), interval(0.1, -0.5, 0.6), 12)
  assert rules.verdict_dose_response(flat, 'accuracy').verdict == 'inconclusive'


def test_equivalence_rule_branches():
  names = ('(0.01, 0.05) - (0.21, 0)', '(0.05, 0.04) - (0.21, 0)')
  inside = [interval(0.1, -0.3, 0.4), interval(-0.1, -0.45, 0.3)]
  assert rules.verdict_equivalence(inside, 0.5, names, unit='points').verdict == \
      'reproduced'
  # Inside the margin and excluding 0: the protocol's first rule decides.
  small = [interval(0.2, 0.1, 0.3), interval(-0.1, -0.45, 0.3)]
  assert rules.verdict_equivalence(small, 0.5, names).verdict == 'reproduced'
  apart = [interval(0.1, -0.3, 0.4), interval(1.0, 0.4, 1.6)]
  result = rules.verdict_equivalence(apart, 0.5, names)
  assert result.verdict == 'not reproduced'
  assert result.why.endswith(f'the interval of {names[1]} excludes 0')
  wide = [interval(0.1, -0.9, 1.1), interval(0.0, -0.3, 0.3)]
  assert rules.verdict_equivalence(wide, 0.5, names).verdict == 'inconclusive'


def test_cost_rule_branches():
  assert rules.verdict_cost(interval(-0.4, -0.9, 0.1), 'JR - no JR',
                            floor=-1).verdict == 'reproduced'
  assert rules.verdict_cost(interval(-0.4, -1.0, 0.1), 'JR - no JR',
                            floor=-1).verdict == 'reproduced'  # the lower end may be -1
  assert rules.verdict_cost(interval(-2.0, -3.0, -1.2), 'JR - no JR',
                            floor=-1).verdict == 'not reproduced'
  assert rules.verdict_cost(interval(-0.8, -1.6, 0.0), 'JR - no JR',
                            floor=-1).verdict == 'inconclusive'
  one = rules.difference([0.5], [0.6])
  assert rules.verdict_cost(one, 'd', floor=-1).verdict == 'inconclusive'
  assert rules.verdict_at_most(1.27, 1.30, 'memory JR / no JR') == (
      'reproduced', 'memory JR / no JR 1.27, at most 1.3')
  assert rules.verdict_at_most(1.31, 1.30, 'memory').verdict == 'not reproduced'


def test_deterministic_tolerance_rules():
  assert rules.verdict_orders([1.02, 1.93], [1, 2], ['exact', 'modified']).verdict \
      == 'reproduced'
  off = rules.verdict_orders([1.02, 1.85], [1, 2], ['exact', 'modified'])
  assert off.verdict == 'not reproduced' and 'modified off by more than 0.1' in off.why
  h = [0.06, 0.0025, 0.01]  # the order of the doses does not matter
  assert rules.verdict_decreasing([1.0, 1.2, 1.1], h, '|theta|').verdict == \
      'reproduced'
  flat = rules.verdict_decreasing([1.0, 1.2, 1.2], h, '|theta|')
  assert flat.verdict == 'not reproduced' and 'from h = 0.0025 to 0.01' in flat.why
  assert rules.verdict_within(102, 100, 'memory at 40').verdict == 'reproduced'
  assert rules.verdict_within(106, 100, 'memory at 40') == (
      'not reproduced', 'memory at 40 106 against 100 (+6.0%), outside 5%')
  assert rules.verdict_all_fit([0.06, 0.1], 0.05, 'lr 1e-2').verdict == 'reproduced'
  assert rules.verdict_all_fit([0.06, 0.11], 0.05, 'lr 1e-2') == (
      'not reproduced', 'lr 1e-2: 1 of 2 runs within 2x the floor 0.05 (worst 0.11)')


def test_gate_rule():
  base = rules.Verdict('reproduced', 'EGR - plain: +1')
  assert rules.verdict_gate(base, 0.856, 0.85, 'plain accuracy') == (
      'reproduced', 'EGR - plain: +1; plain accuracy 0.856 reaches 0.85')
  assert rules.verdict_gate(base, 0.84, 0.85, 'plain accuracy').verdict == \
      'inconclusive'


def test_deqtx_fig7_rule():
  yes, no = rules.Verdict('reproduced', 'a'), rules.Verdict('not reproduced', 'b')
  maybe = rules.Verdict('inconclusive', 'c')
  assert rules.verdict_deqtx_fig7([yes, yes], yes, maybe).verdict == 'reproduced'
  assert rules.verdict_deqtx_fig7([yes, yes], yes, yes).verdict == 'trend reproduced'
  assert rules.verdict_deqtx_fig7([yes, yes], maybe, no).verdict == 'trend reproduced'
  assert rules.verdict_deqtx_fig7([no, no], yes, maybe).verdict == 'not reproduced'
  result = rules.verdict_deqtx_fig7([yes, maybe], yes, maybe)
  assert result == ('inconclusive', '(i) a; (i) c; (ii) no JR: a; (ii) JR: c; (i) '
                    'does not hold at every budget')


# --- caps and divergence ------------------------------------------------------


def test_cap_rule():
  assert rules.cap_fraction([3, 60, 12, 60], 60) == 0.5
  base = rules.Verdict('reproduced', 'NFE no JR / JR: 2.1x')
  kept = rules.apply_cap_rule(base, 0.05, 0.0, ('no JR', 'JR'))  # 5% is allowed
  assert kept == ('reproduced', 'NFE no JR / JR: 2.1x; 5.0% of no JR and 0.0% of '
                  'JR examples at the cap')
  capped = rules.apply_cap_rule(base, 0.0, 0.051, ('no JR', 'JR'))
  assert capped.verdict == 'inconclusive' and 'the cap could decide it' in capped.why


def test_divergence():
  assert not rules.diverged([2.0, 1.0], [5.0, 2.0, 3.0])
  assert not rules.diverged([2.0, 1.0], [5.0, 2.0, 20.0])   # exactly 10x the best
  assert rules.diverged([2.0, 1.0], [5.0, 2.0, 20.1])
  assert rules.diverged([2.0, np.nan], [5.0, 2.0])
  assert rules.diverged([2.0, 1.0], [5.0, np.inf])
  assert rules.last_finite([3.0, 2.0, np.nan, np.inf]) == 2.0
  with pytest.raises(ValueError):
    rules.last_finite([np.nan])
  assert rules.divergence_note(['JR 0', 'no JR 0'], [False, True]) == \
      '1 of 2 runs diverged (no JR 0)'
  assert rules.divergence_note(['JR 0', 'no JR 0'], [False, False]) == \
      'no run of 2 diverged'


# --- sensitivity --------------------------------------------------------------


def test_sensitivity_on_the_new_seeds():
  seeds = [0, 1, 2, 3, 4]
  a, b = [0.52, 0.50, 0.51, 0.53, 0.52], [0.50, 0.49, 0.47, 0.48, 0.49]

  def rule(x, y):
    return rules.verdict_difference(rules.difference(x, y), 'JR - no JR')

  full = rule(a, b)
  new = rules.sensitivity(rule, seeds, [2, 3, 4], a, b)
  assert new.verdict == rule(a[2:], b[2:]).verdict
  assert new.why == 'on seeds 2, 3, 4 alone: ' + rule(a[2:], b[2:]).why
  assert new.why != 'on seeds 2, 3, 4 alone: ' + full.why
  alone = rules.sensitivity(rule, seeds, [2], a, b)
  assert alone.verdict == 'inconclusive' and alone.why.startswith('on seed 2 alone')
  with pytest.raises(ValueError, match='no entry'):
    rules.sensitivity(rule, seeds, [7], a, b)


def test_sensitivity_of_a_dose_response_keeps_whole_seeds():
  doses = np.tile([0.0, 1.0, 2.0], 3)
  seeds = np.repeat([0, 1, 2], 3)
  values = np.concatenate([-doses[:3], -doses[:3], doses[:3]])

  def rule(d, v, s):
    return rules.verdict_dose_response(rules.dose_response(d, v, s, n_boot=300),
                                       'accuracy')

  assert rules.sensitivity(rule, seeds, [0, 1], doses, values, seeds).verdict == \
      'not reproduced'
  assert 'over 3 runs' in rules.sensitivity(rule, seeds, [2], doses, values, seeds).why
