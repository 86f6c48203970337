r"""The statistics and verdict rules of the reproduction protocol, second edition.

Implements the "General rules" of `docs/reproduction_protocol.md` as pure
functions of per-seed (or per-run) numbers, with no JAX and no run folders:

- `difference`: the paired mean difference over seeds and its interval
      mean(d) ± t(0.975, n-1) · sqrt(var_seeds(d)/n + v_test),
  with `accuracy_test_variance` and `perplexity_test_variance` for v_test;
- `ratio`: the same on per-seed log-ratios, exponentiated;
- `dose_response`: least-squares slope and Spearman correlation against a
  dose, with percentile intervals from a bootstrap over whole seeds
  (`partial_spearman` beside it for mnist-lr);
- `verdict_*`: each rule family's verdict with a one-sentence "why" naming
  the numbers; `apply_cap_rule` and `diverged` for budgets and divergence;
- `sensitivity`: a verdict recomputed on a subset of the seeds.

Verdicts are the protocol's: 'reproduced', 'trend reproduced',
'inconclusive', 'not reproduced', 'not testable here'.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np
from scipy import stats

VERDICTS = ('reproduced', 'trend reproduced', 'inconclusive', 'not reproduced',
            'not testable here')
LEVEL = 0.95            # every interval of the protocol is a 95% interval
N_BOOT = 10_000         # bootstrap resamples of whole seeds
CAP_FRACTION = 0.05     # more examples than this at the cap: inconclusive
DIVERGENCE_FACTOR = 10  # final validation measure > 10x its best: diverged


class Interval(NamedTuple):
  """A point estimate with its interval, from `n` seeds."""
  estimate: float
  low: float
  high: float
  n: int
  level: float = LEVEL


class DoseResponse(NamedTuple):
  """`dose_response`'s slope and Spearman correlation, each with its interval."""
  slope: Interval
  spearman: Interval
  n_runs: int


class Verdict(NamedTuple):
  """A verdict (one of VERDICTS) and the sentence that says why."""
  verdict: str
  why: str


# --- intervals over seeds -----------------------------------------------------


def t_quantile(n: int, level: float = LEVEL) -> float:
  """t((1 + level)/2, n - 1): 4.303 for n = 3, 2.776 for n = 5 at 95%."""
  return float(stats.t.ppf((1 + level) / 2, n - 1))


def difference(a_per_seed: Sequence[float], b_per_seed: Sequence[float], *,
               test_variance: float = 0.0, level: float = LEVEL) -> Interval:
  """The paired difference A - B over seeds and its interval.

  With d_s = a_s - b_s over n seeds (a_s and b_s from the same seed s),

      mean(d) ± t((1 + level)/2, n - 1) · sqrt(var_seeds(d)/n + v_test),

  var_seeds the sample variance (ddof 1) and v_test = `test_variance` the
  sampling variance of the measure on the finite test set. v_test is not
  divided by n: every seed is evaluated on the same test set, so its sampling
  error does not average out over seeds. The t quantile also multiplies the
  known v_test, so where v_test dominates the interval is conservative (it
  covers more than `level`; tested on simulated experiments). With one seed
  there is no interval (low and high are NaN).
  """
  a, b = np.asarray(a_per_seed, float), np.asarray(b_per_seed, float)
  if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
    raise ValueError(f'paired differences need two equal-length, non-empty lists '
                     f'of per-seed values; got shapes {a.shape} and {b.shape}')
  if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    raise ValueError('a per-seed value is not finite: a diverged run enters with '
                     'its last finite value (see `last_finite`)')
  d = a - b
  n = len(d)
  if n < 2:
    return Interval(float(d[0]), float('nan'), float('nan'), n, level)
  half = t_quantile(n, level) * np.sqrt(np.var(d, ddof=1) / n + test_variance)
  return Interval(float(d.mean()), float(d.mean() - half), float(d.mean() + half),
                  n, level)


def ratio(a_per_seed: Sequence[float], b_per_seed: Sequence[float], *,
          test_variance: float = 0.0, level: float = LEVEL) -> Interval:
  """The paired ratio A / B over seeds and its interval, from log-ratios.

  `difference` of log a_s and log b_s (so `test_variance` is that of the
  log-ratio), exponentiated: the estimate is the geometric mean of the
  per-seed ratios a_s / b_s.
  """
  a, b = np.asarray(a_per_seed, float), np.asarray(b_per_seed, float)
  if np.any(a <= 0) or np.any(b <= 0):
    raise ValueError('ratios need positive per-seed values')
  log = difference(np.log(a), np.log(b), test_variance=test_variance, level=level)
  return Interval(float(np.exp(log.estimate)), float(np.exp(log.low)),
                  float(np.exp(log.high)), log.n, level)


def accuracy_test_variance(p_a: Sequence[float] | float, p_b: Sequence[float] | float,
                           n_examples: int) -> float:
  """v_test of a difference of accuracies on N test examples.

  (p_A(1 - p_A) + p_B(1 - p_B)) / N, each p averaged over seeds: the binomial
  variances of the two arms' accuracies, added.
  """
  p_a, p_b = float(np.mean(p_a)), float(np.mean(p_b))
  return (p_a * (1 - p_a) + p_b * (1 - p_b)) / n_examples


def mean_loss_variance(block_losses: Sequence[float] | np.ndarray) -> float:
  """Variance of the mean token loss L over K equal blocks (32 tokens each).

  var(l)/K, var the sample variance (ddof 1) of the blocks' mean losses l_k.
  Per-seed losses (a 2-D array, seeds x blocks) are first averaged over seeds
  block by block, as an accuracy is averaged over seeds.
  """
  blocks = np.asarray(block_losses, float)
  if blocks.ndim == 2:
    blocks = blocks.mean(axis=0)
  if blocks.ndim != 1 or len(blocks) < 2:
    raise ValueError('need the mean losses of at least two blocks')
  return float(np.var(blocks, ddof=1) / len(blocks))


def perplexity_variance(block_losses: Sequence[float] | np.ndarray) -> float:
  """Variance of a perplexity exp(L), by the delta method.

  Var(exp(L)) ≈ exp(L)² · Var(L) = exp(2L) · var(l)/K, L the mean of the K
  blocks' mean losses l_k (`mean_loss_variance`; per-seed losses averaged over
  seeds first). First order in Var(L): accurate while Var(L) << 1.
  """
  blocks = np.asarray(block_losses, float)
  mean_loss = float(blocks.mean(axis=0).mean() if blocks.ndim == 2 else blocks.mean())
  return float(np.exp(2 * mean_loss) * mean_loss_variance(blocks))


def perplexity_test_variance(blocks_a, blocks_b, *, log: bool = False) -> float:
  """v_test of a difference of perplexities (or, `log=True`, of a log-ratio).

  Var(PPL_A) + Var(PPL_B) by `perplexity_variance`; for the log-ratio
  log(PPL_A / PPL_B) = L_A - L_B no exp is needed: Var(L_A) + Var(L_B).
  """
  one = mean_loss_variance if log else perplexity_variance
  return one(blocks_a) + one(blocks_b)


# --- dose-response ------------------------------------------------------------


def weighted_slope(x, y, weights) -> np.ndarray:
  """Least-squares slope of y on x with integer run weights, one per row.

  sum w (x - x̄)(y - ȳ) / sum w (x - x̄)², x̄ and ȳ weighted means: the slope
  of the data in which run i is copied w_i times. `weights` is (B, N); NaN
  where the weighted x has no spread.
  """
  w = np.atleast_2d(np.asarray(weights, float))
  with np.errstate(invalid='ignore', divide='ignore'):
    total = w.sum(axis=1, keepdims=True)
    dx = x - (w @ x)[:, None] / total
    dy = y - (w @ y)[:, None] / total
    sxx = np.sum(w * dx * dx, axis=1)
    return np.where(sxx > 1e-12 * np.sum(w * x * x, axis=1),
                    np.sum(w * dx * dy, axis=1) / sxx, np.nan)


def weighted_ranks(v, weights) -> np.ndarray:
  """Average ranks (1-based, ties share their mean) of v with run i copied w_i times.

  rank_i = sum_j w_j [v_j < v_i] + (sum_j w_j [v_j = v_i] + 1) / 2.
  """
  w = np.atleast_2d(np.asarray(weights, float))
  less = (v[None, :] < v[:, None]).astype(float)    # [i, j] = v_j < v_i
  equal = (v[None, :] == v[:, None]).astype(float)
  return w @ less.T + (w @ equal.T + 1) / 2


def weighted_spearman(x, y, weights) -> np.ndarray:
  """Spearman correlation of the data in which run i is copied w_i times.

  The Pearson correlation of the average ranks (`weighted_ranks`), weighted by
  w; NaN where either variable's ranks have no spread.
  """
  w = np.atleast_2d(np.asarray(weights, float))
  rx, ry = weighted_ranks(x, w), weighted_ranks(y, w)
  total = w.sum(axis=1, keepdims=True)
  dx = rx - np.sum(w * rx, axis=1, keepdims=True) / total
  dy = ry - np.sum(w * ry, axis=1, keepdims=True) / total
  sxx, syy = np.sum(w * dx * dx, axis=1), np.sum(w * dy * dy, axis=1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where((sxx > 1e-12) & (syy > 1e-12),
                    np.sum(w * dx * dy, axis=1) / np.sqrt(sxx * syy), np.nan)


def seed_bootstrap_weights(seeds: Sequence[int], n_boot: int,
                           rng: np.random.Generator) -> np.ndarray:
  """(n_boot, runs) weights of a bootstrap over whole seeds.

  Each resample draws as many seeds as there are, with replacement; a run's
  weight is the number of times its seed was drawn, so every run of a drawn
  seed (all its dose levels) enters together.
  """
  seeds = np.asarray(seeds)
  unique, index = np.unique(seeds, return_inverse=True)
  counts = rng.multinomial(len(unique), np.full(len(unique), 1 / len(unique)),
                           size=n_boot)
  return counts[:, index]


def dose_response(doses: Sequence[float], values: Sequence[float],
                  seeds: Sequence[int], *,
                  transform: Callable[[np.ndarray], np.ndarray] | None = None,
                  groups: Sequence | None = None, n_boot: int = N_BOOT,
                  rng_seed: int = 0, level: float = LEVEL) -> DoseResponse:
  """Slope and Spearman correlation of `values` against the dose, over all runs.

  One entry per run: its dose, its value, its seed. The slope is that of
  least squares of the value on x = transform(dose) (the dose itself, or
  e.g. np.log10 for a log-dose); with `groups` (e.g. the width of each run)
  it is the mean, weights equal, of the slopes fitted within each group. The
  Spearman correlation is that of the dose and the value (a monotone
  transform does not change it). Each interval is the percentile interval of
  `n_boot` resamples of whole seeds (`seed_bootstrap_weights`); resamples on
  which a statistic is undefined (the drawn runs have one dose level, or
  constant values) are left out of its interval.
  """
  doses, y = np.asarray(doses, float), np.asarray(values, float)
  x = np.asarray(transform(doses), float) if transform is not None else doses
  if not (x.shape == y.shape == np.shape(seeds)) or x.ndim != 1:
    raise ValueError('doses, values and seeds need one entry per run')
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    raise ValueError('a dose or value is not finite: a diverged run enters with '
                     'its last finite value (see `last_finite`)')
  weights = seed_bootstrap_weights(seeds, n_boot, np.random.default_rng(rng_seed))
  ones = np.ones((1, len(x)))

  def slope(w):
    if groups is None:
      return weighted_slope(x, y, w)
    g = np.asarray(groups)
    return np.mean([weighted_slope(x[g == k], y[g == k], w[:, g == k])
                    for k in np.unique(g)], axis=0)

  def interval(statistic):
    boot = statistic(weights)
    boot = boot[np.isfinite(boot)]
    tail = (1 - level) / 2
    low, high = (np.quantile(boot, [tail, 1 - tail]) if len(boot)
                 else (np.nan, np.nan))
    return Interval(float(statistic(ones)[0]), float(low), float(high),
                    len(np.unique(seeds)), level)

  return DoseResponse(interval(slope),
                      interval(lambda w: weighted_spearman(doses, y, w)), len(x))


def partial_spearman(x, y, z) -> float:
  """Spearman correlation of x and y given z (mnist-lr: accuracy and h given
  the width), from the three rank correlations r:

      (r_xy - r_xz r_yz) / sqrt((1 - r_xz²)(1 - r_yz²)).
  """
  x, y, z = (np.asarray(v, float) for v in (x, y, z))
  ones = np.ones((1, len(x)))
  r_xy, r_xz, r_yz = (float(weighted_spearman(u, v, ones)[0])
                      for u, v in ((x, y), (x, z), (y, z)))
  return (r_xy - r_xz * r_yz) / np.sqrt((1 - r_xz ** 2) * (1 - r_yz ** 2))


# --- verdicts -----------------------------------------------------------------


def _number(x: float, times: bool) -> str:
  return f'{x:.3g}x' if times else f'{x:+.3g}'


def describe(interval: Interval, what: str, *, unit: str = '',
             times: bool = False) -> str:
  """'what: +0.42 points [-0.1, +0.94] (95%, 3 seeds)'; ratios as '2.04x'."""
  estimate = _number(interval.estimate, times) + (f' {unit}' if unit else '')
  bounds = (f'[{_number(interval.low, times)}, {_number(interval.high, times)}]'
            if np.isfinite(interval.low) else 'no interval')
  return (f'{what}: {estimate} {bounds} '
          f'({interval.level:.0%}, {interval.n} seed{"s" * (interval.n != 1)})')


def judge(interval: Interval, *, side: int = 1, size: float | None = None,
          no_effect: float = 0.0) -> tuple[str, str]:
  """The difference rule: (verdict, reason) for an interval and the paper's side.

  side +1: the paper says the measure exceeds `no_effect`; -1: falls below.
  - reproduced: the interval excludes `no_effect` on the paper's side and,
    where the paper states a `size`, side · (estimate - size) >= 0;
  - trend reproduced: on the paper's side, short of the size;
  - inconclusive: the interval includes `no_effect` (or there is none);
  - not reproduced: the interval excludes it on the opposite side.
  """
  if side not in (1, -1):
    raise ValueError(f'side is +1 or -1, not {side}')
  sign = {1: 'above', -1: 'below'}
  e = interval.estimate
  if not (np.isfinite(interval.low) and np.isfinite(interval.high)):
    return 'inconclusive', (f'without an interval (n = {interval.n}) nothing is '
                            'decided; the estimate lies ' +
                            ('on' if side * (e - no_effect) > 0 else 'against') +
                            " the paper's side")
  if interval.low <= no_effect <= interval.high:
    here = np.sign(e - no_effect)
    where = ('at no effect' if here == 0 else
             f"{sign[int(here)]} it, {'on' if here == side else 'against'} the "
             "paper's side")
    return 'inconclusive', f'the interval includes {no_effect:g}; the estimate is {where}'
  if np.sign(interval.low - no_effect) != side:
    return 'not reproduced', (f'the interval lies {sign[-side]} {no_effect:g}, '
                              "the side opposite to the paper's")
  reason = f"the interval lies {sign[side]} {no_effect:g}, the paper's side"
  if size is None:
    return 'reproduced', reason + ' (the paper states no size)'
  if side * (e - size) >= 0:
    return 'reproduced', reason + f", and the estimate reaches the paper's size {size:g}"
  return 'trend reproduced', reason + (f", but the estimate falls short of the "
                                       f"paper's size {size:g}")


def verdict_difference(interval: Interval, what: str, *, side: int = 1,
                       size: float | None = None, unit: str = '') -> Verdict:
  """The difference rule ("no effect" = 0), with an optional stated size."""
  verdict, reason = judge(interval, side=side, size=size, no_effect=0.0)
  return Verdict(verdict, f'{describe(interval, what, unit=unit)}; {reason}')


def verdict_ratio(interval: Interval, what: str, *, side: int = 1,
                  size: float | None = None) -> Verdict:
  """The ratio rule ("no effect" = 1) on a `ratio` interval; size e.g. 2 (2x)."""
  verdict, reason = judge(interval, side=side, size=size, no_effect=1.0)
  return Verdict(verdict, f'{describe(interval, what, times=True)}; {reason}')


def verdict_dose_response(result: DoseResponse, what: str, *, side: int = 1,
                          statistic: str = 'slope') -> Verdict:
  """The dose-response rule: the difference rule on the slope's (or the
  Spearman correlation's) bootstrap interval, "no effect" = 0, no size."""
  decider = getattr(result, statistic)
  verdict, reason = judge(decider, side=side)
  return Verdict(verdict, f'{describe(result.slope, f"slope of {what}")}, '
                 f'{describe(result.spearman, "Spearman")} over {result.n_runs} '
                 f'runs; by the {statistic}: {reason}')


def verdict_equivalence(intervals: Sequence[Interval], margin: float,
                        whats: Sequence[str], *, unit: str = '') -> Verdict:
  """Equivalence (egr-gd-equal): each interval against ±margin and 0.

  reproduced when every interval lies inside [-margin, margin]; else not
  reproduced when one excludes 0; else inconclusive. The rules are applied in
  that order (the protocol's), so an interval inside the margin that excludes
  0 (a difference too small to matter) counts as equivalent.
  """
  described = '; '.join(describe(i, w, unit=unit) for i, w in zip(intervals, whats))
  bound = f'±{margin:g}' + (f' {unit}' if unit else '')
  if all(-margin <= i.low and i.high <= margin for i in intervals):
    return Verdict('reproduced', f'{described}; every interval lies inside {bound}')
  excluding = [w for i, w in zip(intervals, whats) if i.low > 0 or i.high < 0]
  if excluding:
    return Verdict('not reproduced', f'{described}; the interval of '
                   f'{" and ".join(excluding)} excludes 0')
  return Verdict('inconclusive', f'{described}; an interval reaches outside {bound} '
                 'but every one includes 0')


def verdict_cost(interval: Interval, what: str, *, floor: float,
                 unit: str = '') -> Verdict:
  """A cost that the paper bounds (mdeq-cost: at most 1 point, floor = -1).

  reproduced when the interval's lower end is >= floor; not reproduced when
  its upper end is < floor (a cost larger than the paper's); else inconclusive.
  """
  text = describe(interval, what, unit=unit)
  if interval.low >= floor:
    return Verdict('reproduced', f'{text}; the lower end is at or above {floor:+g}')
  if interval.high < floor:
    return Verdict('not reproduced', f'{text}; the upper end is below {floor:+g}, a '
                   "cost larger than the paper's")
  if not np.isfinite(interval.low):
    return Verdict('inconclusive', f'{text}; without an interval nothing is decided')
  return Verdict('inconclusive', f'{text}; the interval straddles {floor:+g}')


def verdict_at_most(value: float, limit: float, what: str) -> Verdict:
  """A deterministic cost (memory-jr: JR / no-JR memory <= 1.30)."""
  if value <= limit:
    return Verdict('reproduced', f'{what} {value:.3g}, at most {limit:g}')
  return Verdict('not reproduced', f"{what} {value:.3g}, above {limit:g}: a cost "
                 "larger than the paper's")


def verdict_within(value: float, reference: float, what: str, *,
                   relative: float = 0.05) -> Verdict:
  """A deterministic equality (memory-nfe): |value / reference - 1| <= relative."""
  change = value / reference - 1
  ok = abs(change) <= relative
  return Verdict('reproduced' if ok else 'not reproduced',
                 f'{what} {value:.4g} against {reference:.4g} ({change:+.1%}), '
                 + ('within' if ok else 'outside') + f' {relative:.0%}')


def verdict_orders(slopes: Sequence[float], expected: Sequence[float], whats:
                   Sequence[str], *, tolerance: float = 0.1) -> Verdict:
  """igr-orders: reproduced when every fitted slope is within tolerance of its order."""
  ok = [abs(s - e) <= tolerance for s, e in zip(slopes, expected)]
  text = ', '.join(f'{w} slope {s:.3f} (theory {e:g})'
                   for w, s, e in zip(whats, slopes, expected))
  if all(ok):
    return Verdict('reproduced', f'{text}: each within {tolerance:g}')
  far = ', '.join(w for w, good in zip(whats, ok) if not good)
  return Verdict('not reproduced', f'{text}: {far} off by more than {tolerance:g}')


def verdict_decreasing(values: Sequence[float], doses: Sequence[float],
                       what: str, dose: str = 'h') -> Verdict:
  """igr-norm, igr-flat: reproduced when strictly decreasing in the dose."""
  values, doses = np.asarray(values, float), np.asarray(doses, float)
  order = np.argsort(doses)
  steps = np.diff(values[order])
  text = (f'{what} from {values[order][0]:.4g} at {dose} = {doses[order][0]:g} to '
          f'{values[order][-1]:.4g} at {dose} = {doses[order][-1]:g}')
  if np.all(steps < 0):
    return Verdict('reproduced', f'{text}, strictly decreasing over {len(values)} '
                   'values')
  rises = [f'{doses[order][i]:g} to {doses[order][i + 1]:g}'
           for i in np.flatnonzero(steps >= 0)]
  return Verdict('not reproduced', f'{text}; not decreasing from {dose} = '
                 + ', '.join(rises))


def verdict_all_fit(errors: Sequence[float], floor: float, what: str, *,
                    factor: float = 2.0) -> Verdict:
  """synth-fit: reproduced when every run's error is within factor x the floor."""
  errors = np.asarray(errors, float)
  fits = int(np.sum(errors <= factor * floor))
  text = (f'{what}: {fits} of {len(errors)} runs within {factor:g}x the floor '
          f'{floor:g} (worst {np.max(errors):.3g})')
  return Verdict('reproduced' if fits == len(errors) else 'not reproduced', text)


def verdict_gate(result: Verdict, value: float, target: float, what: str) -> Verdict:
  """A precondition (egr-resnet: the plain arm reaches 85%): inconclusive
  when value < target, else `result`, its why extended by the check."""
  if value >= target:
    return Verdict(result.verdict, f'{result.why}; {what} {value:.4g} reaches '
                   f'{target:g}')
  return Verdict('inconclusive', f'{result.why}; but {what} {value:.4g} is below '
                 f'{target:g}, so the comparison is inconclusive')


def verdict_deqtx_fig7(budget_ratios: Sequence[Verdict], slope_no_jr: Verdict,
                       slope_jr: Verdict) -> Verdict:
  """deqtx-fig7: (i) the perplexity ratio no-JR / JR at each low budget by the
  ratio rule, (ii) the NFE slope over the second half of training per arm by
  the dose-response rule (paper's side: positive).

  reproduced when (i) is reproduced at every budget and (ii) no-JR's slope is
  reproduced while JR's is not; trend reproduced when only (i) holds; not
  reproduced when (i) holds on the opposite side at every budget; else
  inconclusive.
  """
  why = '; '.join([f'(i) {v.why}' for v in budget_ratios] +
                  [f'(ii) no JR: {slope_no_jr.why}', f'(ii) JR: {slope_jr.why}'])
  if all(v.verdict == 'reproduced' for v in budget_ratios):
    if slope_no_jr.verdict == 'reproduced' and slope_jr.verdict != 'reproduced':
      return Verdict('reproduced', why)
    return Verdict('trend reproduced', f'{why}; only (i) holds')
  if all(v.verdict == 'not reproduced' for v in budget_ratios):
    return Verdict('not reproduced', f'{why}; (i) holds on the opposite side')
  return Verdict('inconclusive', f'{why}; (i) does not hold at every budget')


# --- budgets, caps and divergence ---------------------------------------------


def cap_fraction(nfe: Sequence[float], cap: int) -> float:
  """The fraction of examples whose solve ended at the cap (NFE >= cap)."""
  nfe = np.asarray(nfe)
  return float(np.mean(nfe >= cap))


def apply_cap_rule(result: Verdict, fraction_a: float, fraction_b: float,
                   names: Sequence[str] = ('A', 'B'), *,
                   limit: float = CAP_FRACTION) -> Verdict:
  """The cap rule: inconclusive when more than `limit` (5%) of either arm's
  examples sit at the cap (a mean over them is only a lower bound); else
  `result`, its why extended by the two fractions."""
  text = (f'{fraction_a:.1%} of {names[0]} and {fraction_b:.1%} of {names[1]} '
          'examples at the cap')
  if max(fraction_a, fraction_b) > limit:
    return Verdict('inconclusive', f'{result.why}; but {text}, over {limit:.0%}: the '
                   'cap could decide it')
  return Verdict(result.verdict, f'{result.why}; {text}')


def diverged(train_losses: Sequence[float], validation: Sequence[float], *,
             factor: float = DIVERGENCE_FACTOR) -> bool:
  """A run diverged when a loss is non-finite, or its final validation measure
  (lower is better: a loss, a perplexity) is more than `factor` x its best."""
  losses, val = np.asarray(train_losses, float), np.asarray(validation, float)
  if not (np.all(np.isfinite(losses)) and np.all(np.isfinite(val))):
    return True
  return bool(len(val) and val[-1] > factor * val.min())


def last_finite(values: Sequence[float]) -> float:
  """The last finite value (what a diverged run enters the verdicts with)."""
  values = np.asarray(values, float)
  finite = np.flatnonzero(np.isfinite(values))
  if not len(finite):
    raise ValueError('no finite value')
  return float(values[finite[-1]])


def divergence_note(names: Sequence[str], flags: Sequence[bool]) -> str:
  """'1 of 6 runs diverged (no JR seed 2)' or 'no run diverged'."""
  hit = [n for n, f in zip(names, flags) if f]
  if not hit:
    return f'no run of {len(names)} diverged'
  return f'{len(hit)} of {len(names)} runs diverged ({", ".join(hit)})'


# --- sensitivity --------------------------------------------------------------


def sensitivity(rule: Callable[..., Verdict], seeds: Sequence[int],
                subset: Sequence[int], *arrays) -> Verdict:
  """`rule(*arrays)` computed on the entries whose seed is in `subset`.

  `seeds` gives each entry's seed (per seed for paired rows, per run for
  dose-response rows); the why is prefixed by the seeds used, e.g. the
  protocol's verdict on the new seeds alone.
  """
  seeds = np.asarray(seeds)
  keep = np.isin(seeds, list(subset))
  if not keep.any():
    raise ValueError(f'no entry has a seed in {list(subset)}')
  result = rule(*[np.asarray(a)[keep] for a in arrays])
  used = ', '.join(str(s) for s in sorted(set(seeds[keep].tolist())))
  return Verdict(result.verdict, f'on seed{"s" * (len(set(seeds[keep])) != 1)} '
                 f'{used} alone: {result.why}')
