r"""The reproduction report: the papers' claims, measured at a scale this CPU runs.

Reads finished runs (their commands are in BUILD_NOTES.md, "Reproduction
report"), measures what the runs themselves do not log (DEQ accuracy and
perplexity at fixed forward budgets, the cost of an EGR step), and writes

  OUT/reproduction.json        every number of the report, one row per claim
  OUT/reproduction.md          per paper: claim, paper's figure, jreg's
                               figure, scale, verdict
  OUT/figures/repro_*.png      the figures the report shows

    python -m experiments.reproduction --runs=runs/repro --out=docs

`--sections=egr` rebuilds only the named sections and keeps the other rows as
OUT/reproduction.json has them: the EGR runs continue over several sittings
in `reproduction_runs/`, and their row is updated from that folder alone.

Verdicts are decided by the rules in `verdict_*` below, written before the
runs finished and never changed to fit them: 'reproduced', 'trend
reproduced' (the direction holds, the size or the scale differs), 'not
reproduced', 'not testable here' (with the measured reason).

Papers: [BD21] Barrett & Dherin, "Implicit Gradient Regularization", ICLR
2021. [BKK21] Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by
Jacobian Regularization", ICML 2021.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
import optax

from jreg import checkpoint as checkpoint_lib
from jreg import cli
from jreg import data
from jreg import gradient_regularization as gr
from jreg import metrics as metrics_lib
from jreg import plotting
from jreg import rundir
from jreg import tasks
from jreg import train
from jreg import xla_cpu
from jreg.data import wikitext
from jreg.tasks import checks
from jreg.tasks import deq_lm
from jreg.tasks import igr
from jreg.tasks import mdeq as mdeq_task
from jreg.tasks import optimizers
from jreg.tasks import runs as runs_lib

VERDICTS = ('reproduced', 'trend reproduced', 'not reproduced',
            'not testable here')
MDEQ_BUDGETS = (1, 2, 3, 4, 5, 6, 7, 8)   # forward NFE of [BKK21] Table 3's form
MDEQ_BUDGET_EXAMPLES = 2000               # test images read at each budget
WT2_BUDGETS = (2, 4, 6, 8, 12, 16, 24)    # forward NFE for the perplexity probe
WT2_BUDGET_BATCHES = 100                  # validation batches read at each budget
MDEQ_RUNS = {('JR', 0): 'mdeq_jr_s0', ('JR', 1): 'mdeq_jr_s1',
             ('no JR', 0): 'mdeq_nojr_s0', ('no JR', 1): 'mdeq_nojr_s1'}
WT2_RUNS = {'JR': 'wt2_jr', 'no JR': 'wt2_nojr'}
SYNTHETIC_READINGS = {  # folder -> how the paper's text is read
    'synth_literal': "the paper's stated setting (Adam 1e-3, 50 epochs, "
                     'N(0, 0.01) init read as variance)',
    'synth_lr1e-2': 'learning rate 1e-2 (everything else as stated)',
    'synth_init_std0.01': 'N(0, 0.01) init read as standard deviation 0.01',
}
NOISE_FLOOR = 0.05  # validation MSE of a perfect fit: the noise variance
EGR_WORKDIR = 'egr_resnet20'  # RUNS/<this>/runs/<run name>/: experiments.egr_cifar10
EGR_COEFFICIENT = 0.01        # mu of the EGR arm (the 'small' preset's, fixed in advance)
EGR_RUNS = {(label, seed): runs_lib.run_name(
    {'regularizer_coefficient': mu, 'seed': seed})
    for label, mu in (('plain', 0.0), ('EGR', EGR_COEFFICIENT)) for seed in (0, 1)}
EGR_TARGET_ACCURACY = 0.85    # the plain ResNet's target (a well-trained baseline)
EGR_EPOCHS = 20               # the runs' budget (10 left the plain ResNet at 82%)
EGR_WEIGHT_DECAY = 5e-4       # in both arms (without it, 20 epochs left plain at 84.4%)
# What the four EGR runs must share: everything that shapes training but mu
# and the seed.
EGR_RECIPE = ('model.name', 'batch_size', 'num_steps', 'learning_rate', 'optimizer',
              'data.train_examples', 'regularizer.method')


# --- reading runs -----------------------------------------------------------


def read_json(path: str) -> Any:
  """The JSON at `path`; a missing run is one sentence, not a traceback."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} is missing: run the command for it listed in BUILD_NOTES.md '
        '("Reproduction report") first.')
  with open(path) as f:
    return json.load(f)


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The configuration a run was trained with (its config.json)."""
  saved = rundir.read_config(workdir)
  if saved is None:
    raise FileNotFoundError(f'{workdir} has no config.json: is it a run folder?')
  return ml_collections.ConfigDict(saved)


def restore_params(workdir: str, init_fn, config) -> tuple[Any, Any, int]:
  """`(params, model_state, step)` of the newest verified checkpoint."""
  optimizer, _ = optimizers.make_optimizer(config.learning_rate, config.optimizer,
                                           config.num_steps)
  template = train.init_state(init_fn, optimizer, config.seed)
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  try:
    step, state, _ = checkpointer.restore_latest(template)
  finally:
    checkpointer.close()
  if step is None:
    raise FileNotFoundError(f'{workdir} has no usable checkpoint.')
  return state.params, state.model_state, step


def cached_per_run(path: str, folders: Sequence[str], compute) -> dict[str, Any]:
  """`{folder: result}`, kept as JSON at `path`: `compute(missing folders)`
  runs only for folders not measured before (evaluations take minutes)."""
  done = read_json(path) if os.path.exists(path) else {}
  missing = [f for f in folders if f not in done]
  if missing:
    done.update(compute(missing))
    with open(path + '.tmp', 'w') as f:
      json.dump(done, f, indent=1)
    os.replace(path + '.tmp', path)
  return {f: done[f] for f in folders}


def finished(runs: str, folders: Mapping[Any, str]) -> dict[Any, str]:
  """The runs of `folders` that finished (wrote results.json)."""
  return {key: folder for key, folder in folders.items()
          if os.path.exists(os.path.join(runs, folder, 'results.json'))}


def evals(history: Sequence[Mapping[str, Any]], split: str = 'eval') -> list[dict]:
  return [r for r in history if r.get('split') == split]


# --- measurements the runs do not log ----------------------------------------


def mdeq_accuracy_at_budgets(workdirs: Sequence[str], budgets=None,
                             examples: int | None = None) -> dict[str, Any]:
  """Test accuracy of trained MDEQs (one architecture) with the forward solver
  stopped at each budget ([BKK21] Table 3's form), on the first `examples`
  test images in the run's evaluation batches (the solver's stopping rule is
  per batch); one compiled evaluation per budget serves every run."""
  budgets, examples = budgets or MDEQ_BUDGETS, examples or MDEQ_BUDGET_EXAMPLES
  config = run_config(workdirs[0])
  source, data_dir = tasks.data_source(config.data.source, config.data.dir)
  test = data.first_examples(data.load_cifar10('test', source=source,
                                               data_dir=data_dir), examples)
  image_shape = tuple(test['image'].shape[1:])
  init_fn = mdeq_task.build(config, image_shape, config.num_steps).init_fn
  restored = {w: restore_params(w, init_fn, run_config(w)) for w in workdirs}
  name = os.path.basename  # results are keyed by run folder
  out = {name(w): {'step': restored[w][2], 'examples': examples, 'accuracy': {},
                   'forward_nfe': {}} for w in workdirs}
  for budget in budgets:
    probe = config.copy_and_resolve_references()
    probe.deq.eval_max_iter = budget
    predict = xla_cpu.jit(mdeq_task.build(probe, image_shape, config.num_steps).predict_fn)
    for workdir, (params, model_state, _) in restored.items():
      correct, nfe = 0, []
      for batch in data.cifar10_iterator('test', config.eval_batch_size,
                                         mode='eval', arrays=test):
        logits, info = predict(params, model_state, batch['image'])
        mask = np.asarray(batch.get('mask', np.ones(len(batch['label']), bool)))
        correct += int(np.sum((np.argmax(logits, -1) == batch['label']) & mask))
        nfe.append(float(info['forward_nfe']))
      out[name(workdir)]['accuracy'][str(budget)] = correct / examples
      out[name(workdir)]['forward_nfe'][str(budget)] = float(np.mean(nfe))
  return out


def wt2_perplexity_at_budgets(workdirs: Sequence[str], budgets=None,
                              max_batches: int | None = None) -> dict[str, Any]:
  """Validation perplexity of trained DEQ-Transformers (one architecture)
  with the forward solver's budget set to each value and to the training
  budget (the first `max_batches` batches); one compiled evaluation per
  budget serves every run."""
  max_batches = max_batches or WT2_BUDGET_BATCHES
  config = run_config(workdirs[0])
  budgets = sorted(set(budgets or WT2_BUDGETS) | {config.deq.forward.max_iter})
  source, data_dir = tasks.data_source(config.data.source, config.data.dir)
  corpus = wikitext.load_wikitext(config.data.name, source=source,
                                  data_dir=data_dir)
  vocab = len(corpus.vocabulary)
  init_fn = deq_lm.build(config, vocab).init_fn
  restored = {w: restore_params(w, init_fn, run_config(w)) for w in workdirs}
  name = os.path.basename  # results are keyed by run folder
  out = {name(w): {'step': restored[w][2], 'max_batches': max_batches, 'ppl': {},
                   'forward_nfe': {}, 'forward_rel_residual': {}} for w in workdirs}
  for budget in budgets:
    probe = config.copy_and_resolve_references()
    probe.deq.forward.max_iter = budget
    built = deq_lm.build(probe, vocab)
    for workdir, (params, _, _) in restored.items():
      result = deq_lm.perplexity(built, params, corpus.valid, config.eval_batch_size,
                                 config.data.eval_seq_len, max_batches=max_batches)
      for key in ('ppl', 'forward_nfe', 'forward_rel_residual'):
        out[name(workdir)][key][str(budget)] = result[key]
  return out


def egr_step_cost(model: str = 'resnet20', batch_size: int = 128,
                  coefficient: float = EGR_COEFFICIENT, steps: int = 3,
                  method: str | None = None) -> dict[str, Any]:
  """Seconds per SGD step of a CIFAR ResNet, plain and with the exact EGR
  penalty (`method`, default: the one `experiments/egr_cifar10.py` trains
  with), each as that experiment compiles it, interleaved in one process;
  median of `steps`."""
  method = method or cli.get_config('egr_cifar10').regularizer.method
  optimizer = optax.sgd(0.1, momentum=0.9)
  images = np.random.default_rng(0).normal(size=(batch_size, 32, 32, 3))
  batch = {'image': images.astype(np.float32),
           'label': np.arange(batch_size, dtype=np.int32) % 10}
  updates, states = {}, {}
  for mu in (0.0, coefficient):
    task = igr.cifar_resnet_task(
        model, igr.conv_implementation(mu, method))
    grad_fn = gr.gradient_penalty_grad_fn(task.loss_fn, coefficient=mu,
                                          method=method)
    updates[mu] = train.Parallel('single').compile(
        train.make_update(grad_fn, optimizer))   # as training compiles it
    states[mu] = train.init_state(task.init, optimizer, 0)
    states[mu], _ = updates[mu](states[mu], batch)   # compile
    jax.block_until_ready(states[mu])
  times = {mu: [] for mu in updates}
  for _ in range(steps):
    for mu, update in updates.items():
      start = time.perf_counter()
      states[mu], _ = update(states[mu], batch)
      jax.block_until_ready(states[mu])
      times[mu].append(time.perf_counter() - start)
  plain, egr = (float(np.median(times[mu])) for mu in (0.0, coefficient))
  return {'model': model, 'batch_size': batch_size, 'num_params': task.num_params,
          'method': method,
          'seconds_per_step_plain': plain, 'seconds_per_step_egr': egr,
          'egr_over_plain': egr / plain}


def training_wall_time(clock: Sequence[float]) -> float:
  """Total training time from evaluations' `wall_time` (seconds since the
  process started training): a restarted run's clock starts again at 0, so
  each segment adds its last reading."""
  total, last = 0.0, 0.0
  for t in clock:
    if t < last:
      total += last
    last = t
  return total + last


# --- verdict rules ----------------------------------------------------------


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rank correlation (average ranks for ties)."""
  def ranks(v):
    v = np.asarray(v, float)
    order = np.argsort(v, kind='stable')
    r = np.empty(len(v))
    r[order] = np.arange(len(v))
    for value in np.unique(v):  # ties share their mean rank
      r[v == value] = r[v == value].mean()
    return r
  if len(x) < 3:
    return float('nan')
  rx, ry = ranks(x), ranks(y)
  return float(np.corrcoef(rx, ry)[0, 1])


def verdict_order(slope: float, expected: float, tolerance: float = 0.1) -> str:
  """An error order is reproduced when the fitted slope is within tolerance."""
  return 'reproduced' if abs(slope - expected) <= tolerance else 'not reproduced'


def verdict_monotone(values: Sequence[float], decreasing: bool = True) -> str:
  """Reproduced when strictly monotone; trend when the ends are ordered."""
  diffs = np.diff(np.asarray(values, float)) * (-1 if decreasing else 1)
  if np.all(diffs > 0):
    return 'reproduced'
  return 'trend reproduced' if np.sum(diffs) > 0 else 'not reproduced'


def verdict_correlation(rho: float, sign: int, strong: float = 0.7) -> str:
  """A rank correlation with the paper's sign: strong, present, or absent."""
  if np.isnan(rho):
    return 'not testable here'
  if sign * rho >= strong:
    return 'reproduced'
  return 'trend reproduced' if sign * rho > 0.2 else 'not reproduced'


def verdict_ratio(ratio: float, low: float, high: float, trend: float) -> str:
  """Reproduced inside the paper's range; trend when on its side of `trend`."""
  if low <= ratio <= high:
    return 'reproduced'
  if (trend < low and ratio <= trend) or (trend > high and ratio >= trend):
    return 'not reproduced'
  return 'trend reproduced'


# --- the claims -------------------------------------------------------------


def claim(paper, source, text, paper_figure, measured, scale, verdict, why,
          values=None) -> dict[str, Any]:
  assert verdict in VERDICTS, verdict
  return dict(paper=paper, source=source, claim=text, paper_figure=paper_figure,
              measured=measured, scale=scale, verdict=verdict, why=why,
              values=values or {})


def two_parameter_claims(runs: str, figures: str) -> tuple[list[dict], dict]:
  del figures  # the experiment draws its own
  r = read_json(os.path.join(runs, 'igr_two_parameter', 'results.json'))
  ends = r['endpoints']
  hs = [e['learning_rate'] for e in ends]
  norms = [e['param_norm'] for e in ends]
  dists = [e['distance_to_flattest'] for e in ends]
  scale = (f'E(a, b) = (y - abx)^2 / 2, x = 1, y = 3, start (2.8, 3.5); orders '
           f'at T = 0.5 over h = {min(r["order_learning_rates"]):.2g}..'
           f'{max(r["order_learning_rates"]):.2g}; endpoints after T = 20 for '
           f'h = {min(hs)}..{max(hs)} (float64, RK4 flows)')
  return [
      claim('BD21', 'Section 3, Theorem 3.1', 'GD follows the exact gradient flow '
            'to first order in h and the modified flow of L + (h/4)‖∇L‖² '
            'to second order', 'orders 1 and 2',
            f'slopes {r["slope_exact_flow"]:.3f} (exact flow) and '
            f'{r["slope_modified_flow"]:.3f} (modified flow)', scale,
            'reproduced' if verdict_order(r['slope_exact_flow'], 1) == verdict_order(
                r['slope_modified_flow'], 2) == 'reproduced' else 'not reproduced',
            'fitted log-log slopes of the distance after T = 0.5, within 0.1 of '
            'the theory', dict(slope_exact_flow=r['slope_exact_flow'],
                               slope_modified_flow=r['slope_modified_flow'])),
      claim('BD21', 'Prediction 2.1, Fig. 1', 'larger learning rates end at '
            'minima of smaller parameter norm', '‖θ‖ falls as h grows',
            f'‖θ‖ = {norms[0]:.4f} at h = {hs[0]} -> {norms[-1]:.4f} at '
            f'h = {hs[-1]} (exact flow {r["exact_flow_param_norm"]:.4f})', scale,
            verdict_monotone(norms), 'reproduced when strictly decreasing in h '
            'over the whole range', dict(learning_rates=hs, param_norms=norms)),
      claim('BD21', 'Prediction 2.2, Fig. 1', 'larger learning rates end nearer '
            'the flattest minimum', 'distance falls as h grows',
            f'distance to the flattest minimum {dists[0]:.4f} -> {dists[-1]:.4f}',
            scale, verdict_monotone(dists), 'reproduced when strictly decreasing '
            'in h; the effect is small inside the stable range (h lambda_max < 2)',
            dict(learning_rates=hs, distances=dists)),
  ], {}


def mnist_claims(runs: str, figures: str) -> tuple[list[dict], dict]:
  r = read_json(os.path.join(runs, 'mnist_grid', 'results.json'))
  config = run_config(os.path.join(runs, 'mnist_grid', 'runs', next(iter(r['runs']))))
  rows = list(r['runs'].values())
  fit = [row for row in rows if row['reached_stop_rule']]
  lam = [row['igr_rate'] for row in fit]
  rho_acc = spearman(lam, [row['test_accuracy'] for row in fit])
  rho_rig = spearman(lam, [row['r_ig'] for row in fit])
  rho_rig_all = spearman([row['igr_rate'] for row in rows], [row['r_ig'] for row in rows])
  widths = sorted({row['width'] for row in rows})
  rates = sorted({row['learning_rate'] for row in rows})
  scale = (f'{len(rows)} runs: widths {widths} x h {rates}, 5 linear layers, SGD, '
           f'batch {config.batch_size}, first {config.data.train_examples or 60000} '
           f'MNIST training images, all 10,000 test images; stopping rule: the '
           f'first evaluation (every {config.eval_every} steps) at 100% training '
           f'accuracy, capped at {config.num_steps} steps; {len(fit)} of '
           f'{len(rows)} runs reached it')
  plot_mnist_grid(rows, widths, rates, os.path.join(figures, 'repro_mnist_grid.png'))
  values = dict(runs=rows, spearman_lambda_test_accuracy=rho_acc,
                spearman_lambda_r_ig=rho_rig, spearman_lambda_r_ig_all_runs=rho_rig_all,
                num_runs=len(rows), num_reached_stop_rule=len(fit))
  claims = [
      claim('BD21', 'Section 5, Fig. 2(a)', 'among MLPs trained to 100% training '
            'accuracy, test accuracy rises with lambda = hm/4',
            'test accuracy increases with lambda (Fig. 2a)',
            f'Spearman rank correlation of lambda and test accuracy {rho_acc:+.2f} '
            f'over the {len(fit)} runs that reached the rule', scale,
            verdict_correlation(rho_acc, +1),
            'rank correlation >= 0.7: reproduced; > 0.2: trend; the runs capped '
            'before 100% are left out, as the paper plots converged runs', values),
      claim('BD21', 'Section 5, Fig. 2(b)', 'R_IG at the end of training falls '
            'as lambda grows', 'R_IG decreases with lambda (Fig. 2b)',
            f'Spearman of lambda and final R_IG {rho_rig:+.2f} (runs at the rule), '
            f'{rho_rig_all:+.2f} (all runs)', scale, verdict_correlation(rho_rig, -1),
            'rank correlation <= -0.7: reproduced; < -0.2: trend'),
  ]
  return claims, values


def egr_runs(runs: str) -> dict[tuple[str, int], dict[str, Any]]:
  """What each EGR run of `EGR_RUNS` has logged so far (absent runs left out):
  its recipe (`EGR_RECIPE`), its step, its budget, its test evaluations and its
  training R_IG."""
  out = {}
  for key, name in EGR_RUNS.items():
    workdir = os.path.join(runs, EGR_WORKDIR, 'runs', name)
    history = metrics_lib.read_history(workdir)
    if not history:
      continue
    config = run_config(workdir)
    num_steps = config.num_steps
    epoch = (config.data.train_examples or 50_000) // config.batch_size
    train_records = [r for r in history if r['split'] == 'train']
    tests = [(r['step'], r['test_accuracy']) for r in evals(history)]
    finished = any(step == num_steps for step, _ in tests)
    out[key] = dict(
        recipe={path: checks.config_value(config.to_dict(), path) for path in EGR_RECIPE},
        step=max(r['step'] for r in history), num_steps=num_steps, finished=finished,
        final_test_accuracy=igr.final_record(history, num_steps, workdir)[
            'test_accuracy'] if finished else None,
        test_accuracy=tests, r_ig=[(r['step'], r['r_ig']) for r in train_records],
        # R_IG of the last epoch's logged training batches (a minibatch figure).
        final_r_ig=float(np.mean([r['r_ig'] for r in train_records
                                  if r['step'] > num_steps - epoch] or [np.nan])))
  return out


def egr_claims(runs: str, figures: str) -> tuple[list[dict], dict]:
  cost = read_json(os.path.join(runs, 'egr_cost.json'))
  epoch_steps = 50_000 // cost['batch_size']
  # ResNet-20 for EGR_EPOCHS, EGR and plain, two seeds: this many CPU hours
  # at the measured step times.
  hours = 2 * epoch_steps * EGR_EPOCHS * (cost['seconds_per_step_plain'] +
                                          cost['seconds_per_step_egr']) / 3600
  per_run = egr_runs(runs)
  first = next(iter(per_run), None)
  for (label, seed), r in per_run.items():
    differ = [path for path in EGR_RECIPE
              if r['recipe'][path] != per_run[first]['recipe'][path]]
    if differ:
      raise ValueError(
          f'the EGR runs in {os.path.join(runs, EGR_WORKDIR)} were trained with '
          f'different recipes ({", ".join(differ)} of {label} seed {seed} differ from '
          f'{first[0]} seed {first[1]}): the plain and EGR arms may differ only '
          'in mu and the seed.')
  weight_decay = (per_run[first]['recipe']['optimizer']['weight_decay'] if first
                  else EGR_WEIGHT_DECAY)
  plot_egr(per_run, os.path.join(figures, 'repro_egr.png'))
  values = dict(cost=dict(cost, projected_epochs=EGR_EPOCHS,
                          projected_cpu_hours_2_seeds=hours),
                runs={f'{label}, seed {seed}': r for (label, seed), r in per_run.items()})
  text = ('explicit gradient regularisation raises the test accuracy of CIFAR-10 '
          'ResNets and lowers R_IG')
  steps = f'{cost["model"]} step {cost["seconds_per_step_plain"]:.2f} s plain, '\
          f'{cost["seconds_per_step_egr"]:.2f} s with EGR ({cost["egr_over_plain"]:.1f}x)'
  if len(per_run) < len(EGR_RUNS) or not all(r['finished'] for r in per_run.values()):
    progress = '; '.join(
        f'{label} seed {seed}: ' + (
            f'test accuracy {r["final_test_accuracy"]:.3f} at the end' if r['finished']
            else f'step {r["step"]} of {r["num_steps"]}')
        for (label, seed), r in sorted(per_run.items())) or 'no run started'
    return [claim(
        'BD21', 'Section 6, Fig. 3', text, 'higher test accuracy with EGR (ResNet-18)',
        f'not all runs finished: {progress}. {steps}; {EGR_EPOCHS} epochs x 2 '
        f'seeds x 2 settings = {hours:.0f} h of this CPU',
        f'{cost["model"]} ({cost["num_params"]:,} parameters), CIFAR-10, batch '
        f'{cost["batch_size"]}, weight decay {weight_decay:g} in both arms, '
        f'EGR mu = {EGR_COEFFICIENT:g}, seeds 0 and 1',
        'not testable here', 'the EGR runs take several hours each here; they '
        'resume where they stopped and the row is judged once all four finish',
        values)], values
  final = {key: r['final_test_accuracy'] for key, r in per_run.items()}
  rig = {key: r['final_r_ig'] for key, r in per_run.items()}
  seeds = sorted({seed for _, seed in per_run})

  def mean(table, label):
    return float(np.mean([table[(label, s)] for s in seeds]))

  config = run_config(os.path.join(runs, EGR_WORKDIR, 'runs', EGR_RUNS[('EGR', 0)]))
  higher = [final[('EGR', s)] > final[('plain', s)] for s in seeds]
  lower = [rig[('EGR', s)] < rig[('plain', s)] for s in seeds]
  if all(higher) and all(lower):
    verdict = 'reproduced'
  elif mean(final, 'EGR') > mean(final, 'plain'):
    verdict = 'trend reproduced'
  else:
    verdict = 'not reproduced'
  plain = mean(final, 'plain')
  per_seed = ', '.join(f'{final[("EGR", s)]:.3f} vs {final[("plain", s)]:.3f}'
                       for s in seeds)
  epochs = config.num_steps * config.batch_size / 50_000
  return [claim(
      'BD21', 'Section 6, Fig. 3', text, 'higher test accuracy with EGR (ResNet-18)',
      f'test accuracy {mean(final, "EGR"):.3f} (EGR) vs {plain:.3f} (plain), per seed '
      f'{per_seed}; R_IG over the last epoch {mean(rig, "EGR"):.2e} vs '
      f'{mean(rig, "plain"):.2e}',
      f'{config.model.name} ({cost["num_params"]:,} parameters), CIFAR-10 with pad-4 '
      f'crop and flip, SGD Nesterov 0.9, cosine from {config.learning_rate:g}, weight '
      f'decay {weight_decay:g} in both arms, batch '
      f'{config.batch_size}, {config.num_steps} steps ({epochs:.1f} epochs), EGR mu = '
      f'{EGR_COEFFICIENT:g} (H grad L by {config.regularizer.method}), seeds {seeds}; '
      f'{steps}',
      verdict, f'EGR had the higher test accuracy in {sum(higher)} of {len(seeds)} '
      f'seeds and the lower R_IG in {sum(lower)} of {len(seeds)}; reproduced: EGR more '
      'accurate and lower R_IG in every seed; trend: more accurate on average; the '
      'plain ResNet should reach >= '
      f'{EGR_TARGET_ACCURACY:.0%}: plain reached {plain:.1%} '
      + ('(met)' if plain >= EGR_TARGET_ACCURACY else '(not met at this budget)'),
      values)], values


def synthetic_claims(runs: str, figures: str) -> tuple[list[dict], dict]:
  readings, probe_budgets = {}, set()
  for folder, reading in SYNTHETIC_READINGS.items():
    r = read_json(os.path.join(runs, folder, 'results.json'))
    table = {}
    for name, row in r['runs'].items():
      config = run_config(os.path.join(runs, folder, 'runs', name))
      probe_budgets.add(plotting.solver_budgets(config)['probe_nfe_to_tol'])
      table.setdefault(config.jacobian.weight, []).append(dict(row, seed=config.seed))
    readings[folder] = dict(reading=reading, steps=r['steps_per_run'], by_gamma={
        f'{g:g}': dict(
            seeds=[row['seed'] for row in rows],
            validation_mse=[row['validation_mse'] for row in rows],
            nfe_to_tolerance=[row['nfe_to_tol'] for row in rows],
            spectral_radius=[row['spectral_radius'] for row in rows])
        for g, rows in sorted(table.items())})
  plot_synthetic(readings, os.path.join(figures, 'repro_synthetic.png'),
                 probe_budgets)
  copy_synthetic_surfaces(runs, figures)

  def fitted(folder):  # runs within 2x the noise floor
    cells = readings[folder]['by_gamma'].values()
    mse = [m for c in cells for m in c['validation_mse']]
    return sum(m <= 2 * NOISE_FLOOR for m in mse), len(mse)

  def radius_trend(folder):
    by_gamma = readings[folder]['by_gamma']
    gammas = sorted(by_gamma, key=float)
    return [float(np.median(by_gamma[g]['spectral_radius'])) for g in gammas]

  lit_fit, lit_n = fitted('synth_literal')
  best = max((f for f in SYNTHETIC_READINGS if f != 'synth_literal'),
             key=lambda f: fitted(f)[0])
  best_fit, best_n = fitted(best)
  radii = {f: radius_trend(f) for f in SYNTHETIC_READINGS}
  scale = ('1-D DEQ, 50 hidden units, 4,096 training / 1,000 validation pairs, '
           'batch 64, 50 epochs (3,200 steps), Broyden 6/6, gamma in {0, 1, 2, 4} '
           'x seeds {0, 1, 2} per reading')
  values = dict(readings=readings, noise_floor=NOISE_FLOOR,
                fitted_within_2x_floor={f: fitted(f) for f in SYNTHETIC_READINGS},
                median_spectral_radius_by_gamma=radii)
  claims = [
      claim('BKK21', 'Section 5.1, Fig. 5', 'every gamma fits the synthetic '
            'target (the paper shows fitted models)', 'fitted models for all gamma',
            f'{lit_fit} of {lit_n} runs within 2x the noise floor at the stated '
            f'setting; {best_fit} of {best_n} with {SYNTHETIC_READINGS[best]}',
            scale, 'not reproduced' if lit_fit < lit_n // 2 else 'reproduced',
            'the literal setting underfits (Adam 1e-3 for 3,200 steps is too '
            'short for this cell; an independent PyTorch implementation fails the '
            f'same way); the reading that fits is {SYNTHETIC_READINGS[best]}',
            dict(fitted_within_2x_floor={f: fitted(f) for f in SYNTHETIC_READINGS})),
      claim('BKK21', 'Section 5.1, Fig. 5', 'the Jacobian term makes f flatter at '
            'the fixed point', 'flatter surfaces with larger gamma',
            'median rho(J_f(z*)) over seeds for gamma = 0, 1, 2, 4: ' + '; '.join(
                f'{f.replace("synth_", "")} ' + ' / '.join(f'{x:.2f}' for x in v)
                for f, v in radii.items()),
            scale, verdict_monotone(radii[best]),
            f'judged on the reading that fits ({best}): strictly falling median '
            'rho: reproduced; lower at gamma 4 than 0: trend',
            dict(median_spectral_radius_by_gamma=radii)),
  ]
  return claims, values


def mdeq_claims(runs: str, figures: str) -> tuple[list[dict], dict]:
  done = finished(runs, MDEQ_RUNS)
  if {label for label, _ in done} != {'JR', 'no JR'}:
    raise FileNotFoundError(
        f'the MDEQ claims need a finished run with and without JR in {runs} '
        f'(finished: {sorted(done.values())}); see BUILD_NOTES.md '
        '("Reproduction report") for the commands.')
  at_budgets = cached_per_run(
      os.path.join(runs, 'mdeq_accuracy_at_nfe.json'), list(done.values()),
      lambda folders: mdeq_accuracy_at_budgets([os.path.join(runs, f)
                                                for f in folders]))
  per_run = {}
  for (label, seed), folder in done.items():
    workdir = os.path.join(runs, folder)
    history = metrics_lib.read_history(workdir)
    budgets = at_budgets[folder]
    final = evals(history)[-1]
    per_run[f'{label}, seed {seed}'] = dict(
        label=label, seed=seed, final=final, accuracy_at_nfe=budgets,
        evals=evals(history),
        train=[{k: r[k] for k in ('step', 'forward_nfe', 'backward_nfe',
                                  'forward_rel_residual') if k in r}
               for r in history if r['split'] == 'train'])
  config = run_config(os.path.join(runs, done[min(done)]))
  seeds = sorted({seed for _, seed in done})
  plot_mdeq(per_run, config, os.path.join(figures, 'repro_mdeq.png'))

  def mean(label, fn):
    return float(np.mean([fn(r) for r in per_run.values() if r['label'] == label]))

  nfe = {l: mean(l, lambda r: r['final']['probe_nfe_to_tol']) for l in ('JR', 'no JR')}
  acc = {l: mean(l, lambda r: r['final']['accuracy']) for l in ('JR', 'no JR')}
  rho = {l: mean(l, lambda r: r['final']['probe_spectral_radius']) for l in ('JR', 'no JR')}
  wall = {l: mean(l, lambda r: r['final']['train_wall_time']) for l in ('JR', 'no JR')}
  budgets = sorted(int(b) for b in next(iter(per_run.values()))
                   ['accuracy_at_nfe']['accuracy'])
  low_budget = {l: {b: mean(l, lambda r, b=b: r['accuracy_at_nfe']['accuracy'][str(b)])
                    for b in budgets} for l in ('JR', 'no JR')}
  judged = min(budgets, key=lambda b: abs(b - 4))  # [BKK21] Table 3's middle
  epochs = config.num_steps * config.batch_size / 50_000
  standard_error = float(np.sqrt(acc['no JR'] * (1 - acc['no JR']) /
                                 config.data.eval_examples))
  num_params = read_json(os.path.join(runs, done[min(done)], 'results.json')
                         )['num_params']
  examples = next(iter(at_budgets.values()))['examples']
  scale = (f'MDEQ {config.model.name} ({num_params:,} parameters), CIFAR-10, batch '
           f'{config.batch_size}, {config.num_steps} steps ({epochs:.2f} epochs; '
           f'{config.deq.pretrain_steps} unrolled), Broyden '
           f'{config.deq.forward.max_iter}/{config.deq.backward.max_iter}, JR gamma '
           f'{config.jacobian.weight} on p = {config.jacobian.probability} of the '
           f'steps; seeds {seeds} ({len(done)} runs); test on the first '
           f'{config.data.eval_examples} '
           f'images (budgets: the first {examples})')
  ratio = nfe['no JR'] / nfe['JR']
  values = dict(nfe_to_tolerance=nfe, accuracy=acc, spectral_radius=rho,
                train_wall_time=wall, accuracy_at_nfe=low_budget, runs=per_run)
  budget_text = '; '.join(f'NFE {b}: {low_budget["JR"][b]:.3f} vs '
                          f'{low_budget["no JR"][b]:.3f}' for b in budgets)
  claims = [
      claim('BKK21', 'Table 3', 'with the Jacobian term an MDEQ '
            'reaches the same fixed-point accuracy in markedly fewer NFE',
            'about half the NFE (2-3x fewer)',
            f'NFE to relative residual 1e-3 on test images: {nfe["JR"]:.1f} (JR) vs '
            f'{nfe["no JR"]:.1f} (no JR), {ratio:.2f}x fewer', scale,
            verdict_ratio(ratio, 1.8, 3.5, 1.0),
            'ratio of mean probe NFE over the seeds: 1.8-3.5x reproduced, '
            '> 1 trend', values),
      claim('BKK21', 'Table 3 (NFE 1-8)', 'accuracy at a small forward budget is higher '
            'with JR (the regularised model is usable at NFE 1-8)',
            'accuracy at low NFE higher with JR',
            f'test accuracy JR vs no JR, {budget_text}', scale,
            'trend reproduced' if low_budget['JR'][judged] > low_budget['no JR'][judged]
            else 'not reproduced',
            f'judged at NFE {judged} (mean over seeds): higher with JR is the '
            "paper's direction; its size is not compared (other scale)"),
      claim('BKK21', 'Section 5.2 (CIFAR-10)', 'the term costs little accuracy',
            'a small accuracy cost (<= 1 point at full scale)',
            f'test accuracy {acc["JR"]:.3f} (JR) vs {acc["no JR"]:.3f} (no JR); '
            f'training wall time {wall["JR"] / 60:.0f} vs {wall["no JR"] / 60:.0f} '
            'min (cores shared with other runs: not a speed comparison)',
            scale, 'reproduced' if acc['no JR'] - acc['JR'] <= 0.02 else
            'not reproduced', 'a gap of at most 2 points (one run\'s standard '
            f'error on these test images: {100 * standard_error:.1f} points)'),
      claim('BKK21', 'Section 4', 'the term keeps the spectral radius of '
            'J_f(z*) low during training', 'lower rho(J_f) with JR',
            f'rho(J_f(z*)) at the end: {rho["JR"]:.2f} (JR) vs {rho["no JR"]:.2f} '
            '(no JR); over training in the figure', scale,
            'reproduced' if rho['JR'] < rho['no JR'] else 'not reproduced',
            'lower final rho (mean over seeds, power iteration on test images)'),
  ]
  return claims, values


def wt2_claims(runs: str, figures: str) -> tuple[list[dict], dict]:
  at_budgets = cached_per_run(
      os.path.join(runs, 'wt2_ppl_at_nfe.json'), list(WT2_RUNS.values()),
      lambda folders: wt2_perplexity_at_budgets([os.path.join(runs, f)
                                                 for f in folders]))
  per_run = {}
  for label, folder in WT2_RUNS.items():
    workdir = os.path.join(runs, folder)
    history = metrics_lib.read_history(workdir)
    results = read_json(os.path.join(workdir, 'results.json'))
    budgets = at_budgets[folder]
    wall = training_wall_time([r['wall_time'] for r in evals(history)
                               if 'wall_time' in r])
    per_run[label] = dict(results=results, ppl_at_nfe=budgets, evals=evals(history),
                          train_wall_time_s=wall,
                          train=[{k: r[k] for k in ('step', 'forward_nfe',
                                                    'forward_rel_residual',
                                                    'backward_nfe') if k in r}
                                 for r in history if r['split'] == 'train'])
  config = run_config(os.path.join(runs, WT2_RUNS['JR']))
  plot_wt2(per_run, config, os.path.join(figures, 'repro_wt2.png'))
  jr, nojr = per_run['JR'], per_run['no JR']
  nfe = {l: r['results']['valid_forward_nfe'] for l, r in per_run.items()}
  ppl = {l: r['results']['valid_ppl'] for l, r in per_run.items()}
  deq_steps = config.num_steps - config.deq.pretrain_steps
  late = {l: float(np.mean([t['forward_nfe'] for t in r['train']
                            if t['step'] > config.num_steps - deq_steps // 4]))
          for l, r in per_run.items()}
  budgets = sorted(int(b) for b in jr['ppl_at_nfe']['ppl'])
  low, train_budget = budgets[0], config.deq.forward.max_iter
  scale = (f'DEQ-Transformer ({jr["results"]["num_params"]:,} parameters, d_model '
           f'{config.model.d_model}), {config.data.name}, '
           f'batch {config.batch_size} x {config.data.seq_len} tokens, '
           f'{config.num_steps} steps ({config.deq.pretrain_steps} unrolled), '
           f'Anderson {config.deq.forward.max_iter} / Broyden '
           f'{config.deq.backward.max_iter} at tol {config.deq.forward.tol}; '
           f'training wall time {jr["train_wall_time_s"] / 60:.0f} min (JR) and '
           f'{nojr["train_wall_time_s"] / 60:.0f} min (no JR), each pinned to '
           'one core that other runs shared; '
           'validation: the whole split')
  ratio = nfe['no JR'] / nfe['JR']
  values = dict(valid_forward_nfe=nfe, valid_ppl=ppl,
                late_train_forward_nfe=late, runs=per_run)
  ppl_low = {l: r['ppl_at_nfe']['ppl'][str(low)] for l, r in per_run.items()}
  curve = [e['ppl'] for e in nojr['evals'] if e['step'] > config.deq.pretrain_steps]
  diverged = any(p > 1.05 * min(curve[:i + 1]) for i, p in enumerate(curve))
  ppl_at_train_budget = {l: r['ppl_at_nfe']['ppl'][str(train_budget)] for l, r in per_run.items()}
  claims = [
      claim('BKK21', 'Section 5.2 (WikiText-103)', 'the DEQ-Transformer with JR reaches its '
            'perplexity with about half the forward NFE, at a small perplexity '
            'cost', 'NFE roughly halved, perplexity within ~1 point (WikiText-103)',
            f'validation forward NFE {nfe["JR"]:.1f} (JR) vs {nfe["no JR"]:.1f} '
            f'(no JR), {ratio:.2f}x; perplexity {ppl["JR"]:.1f} vs {ppl["no JR"]:.1f} '
            f'({100 * (ppl["JR"] / ppl["no JR"] - 1):+.1f}%)', scale,
            verdict_ratio(ratio, 1.8, 3.5, 1.0),
            'judged on the NFE ratio; the perplexity cost is reported beside it '
            '(the paper\'s is at 98M parameters on WikiText-103)'),
      claim('BKK21', 'Fig. 7', 'without the term the DEQ-Transformer grows '
            'unstable during training: its NFE rises and it degrades at a low '
            'NFE budget', 'unregularised NFE grows; perplexity at a low budget '
            'blows up',
            f'training forward NFE over the last quarter {late["no JR"]:.1f} '
            f'(no JR) vs {late["JR"]:.1f} (JR) of a budget of '
            f'{config.deq.forward.max_iter}; validation perplexity at NFE {low}: '
            f'{ppl_low["no JR"]:.0f} (no JR) vs {ppl_low["JR"]:.0f} (JR), at NFE '
            f'{train_budget}: {ppl_at_train_budget["no JR"]:.0f} vs {ppl_at_train_budget["JR"]:.0f}', scale,
            ('reproduced' if late['no JR'] > late['JR'] and
             ppl_low['no JR'] > 1.5 * ppl_at_train_budget['no JR'] else
             'trend reproduced' if late['no JR'] > late['JR'] else 'not reproduced'),
            'reproduced when the no-JR model needs more NFE late in training and '
            f'its perplexity at NFE {low} is over 1.5x that at the training budget '
            f'{train_budget}; trend when only the NFE part holds. The no-JR '
            'validation perplexity ' + ('rose by over 5% during training (the '
                                        "paper's divergence)" if diverged else
                                        'never rose by 5% during training: no '
                                        'divergence at this scale'),
            dict(no_jr_validation_perplexity_rose=diverged)),
  ]
  return claims, values


def memory_claims(runs: str, figures: str) -> tuple[list[dict], dict]:
  del figures  # a table only
  bench = read_json(os.path.join(runs, 'memory.json'))
  cases = bench['cases']
  mdeq = cases['mdeq_jr']['memory_bytes'] / cases['mdeq']['memory_bytes'] - 1
  deqtx = cases['deqtx_jr']['memory_bytes'] / cases['deqtx']['memory_bytes'] - 1
  by_nfe = bench['memory_against_forward_nfe']
  name, table = next(iter(by_nfe.items()))
  nfe_mb = {n: v['memory_bytes'] / 1e6 for n, v in table.items()}
  values = dict(jr_memory_overhead=dict(mdeq=mdeq, deqtx=deqtx),
                memory_mb_against_forward_nfe={name: nfe_mb},
                cases={n: c['memory_bytes'] for n, c in cases.items()})
  low, high = sorted(nfe_mb, key=int)[0], sorted(nfe_mb, key=int)[-1]
  scale = ('compiled training step of the small presets (MDEQ batch 32, '
           'DEQ-Transformer batch 8 x 32), XLA memory_analysis: temp + '
           'arguments + outputs (CPU has no peak counter)')
  return [
      claim('BKK21', 'Section 5 (memory)', 'the Jacobian term costs about 25-30% more '
            'training memory', '+25-30%',
            f'MDEQ {100 * mdeq:+.1f}%, DEQ-Transformer {100 * deqtx:+.1f}%', scale,
            verdict_ratio(1 + mdeq, 1.2, 1.35, 1.0),
            'judged on the MDEQ (the paper\'s figure is for its image models); '
            'the small DEQ-Transformer\'s step is dominated by its embedding and '
            'adaptive softmax'),
      claim('BKK21', 'Section 2 (implicit differentiation)', 'training memory '
            'does not grow with the forward NFE', 'constant memory in NFE',
            f'{name}: ' + ', '.join(f'{v:.1f} MB at NFE {n}' for n, v in
                                    sorted(nfe_mb.items(), key=lambda kv: int(kv[0]))),
            scale, 'reproduced' if nfe_mb[high] <= 1.05 * nfe_mb[low] else
            'not reproduced', 'reproduced when within 5%; the growth is '
            "Broyden's rank-max_iter buffers (u_i, v_i): with Anderson as the "
            'forward solver the same step plans the same memory at both budgets '
            '(BUILD_NOTES); no iterates are stored for the backward pass'),
  ], values


# --- figures ----------------------------------------------------------------


def label_panels(axes, labels, prefix: str) -> None:
  """Axis labels, `prefix: title`, grid and legend for each panel of `axes`."""
  for ax, (xlabel, ylabel, title) in zip(axes.flat, labels):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f'{prefix}: {title}', fontsize='small')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='x-small')


def plot_mnist_grid(rows, widths, rates, path):
  """[BD21] Fig. 2 as heatmaps over the grid, and against lambda."""
  acc = np.full((len(widths), len(rates)), np.nan)
  rig = np.full_like(acc, np.nan)
  for row in rows:
    i, j = widths.index(row['width']), rates.index(row['learning_rate'])
    acc[i, j], rig[i, j] = row['test_accuracy'], np.log10(row['r_ig'])
  with plotting.figure(path, ncols=4, size=(4.8, 3.8)) as (fig, axes):
    for ax, grid, title, label in (
        (axes[0], acc, 'Test accuracy at the stopping rule', 'test accuracy'),
        (axes[1], rig, 'Final R_IG = ‖∇L‖² / m', 'log10 R_IG')):
      image = ax.imshow(grid, origin='lower', aspect='auto', cmap='viridis')
      ax.set_xticks(range(len(rates)), [f'{h:g}' for h in rates])
      ax.set_yticks(range(len(widths)), [str(w) for w in widths])
      ax.set_xlabel('learning rate h')
      ax.set_ylabel('width (units per hidden layer)')
      ax.set_title(title, fontsize='medium')
      fig.colorbar(image, ax=ax, label=label)
      for row in rows:  # x: the run hit the step cap before 100% training accuracy
        if not row['reached_stop_rule']:
          ax.text(rates.index(row['learning_rate']), widths.index(row['width']),
                  'x', ha='center', va='center', color='white')
    for ax, key, label in ((axes[2], 'test_accuracy', 'test accuracy'),
                           (axes[3], 'r_ig', 'final R_IG')):
      for reached, marker, legend in ((True, 'o', 'reached 100% train accuracy'),
                                      (False, 'x', 'capped before 100%')):
        sel = [r for r in rows if r['reached_stop_rule'] == reached]
        if sel:
          ax.scatter([r['igr_rate'] for r in sel], [r[key] for r in sel],
                     marker=marker, label=legend)
      ax.set_xscale('log')
      if key == 'r_ig':
        ax.set_yscale('log')
      ax.set_xlabel('lambda = h m / 4')
      ax.set_ylabel(label)
      ax.set_title(f'{label[0].upper() + label[1:]} against lambda (Fig. 2)',
                   fontsize='medium')
      ax.legend(fontsize='small')
      ax.grid(alpha=0.3)


def plot_egr(per_run, path):
  """[BD21] Section 6 at this scale: test accuracy and R_IG over training."""
  with plotting.figure(path, ncols=2, size=(5.2, 3.8)) as (fig, axes):
    for (label, seed), r in sorted(per_run.items()):
      style = dict(color=f'C{seed}', ls='-' if label == 'plain' else '--',
                   label=f'{label}, seed {seed}')
      if r['test_accuracy']:
        axes[0].plot(*zip(*r['test_accuracy']), marker='o', ms=3, **style)
      if r['r_ig']:
        axes[1].plot(*zip(*r['r_ig']), **style)
    axes[0].axhline(EGR_TARGET_ACCURACY, color='k', ls=':',
                    label=f'{EGR_TARGET_ACCURACY:.0%} (target, plain)')
    axes[1].set_yscale('log')
    if not per_run:
      axes[0].text(0.5, 0.5, 'no run yet', transform=axes[0].transAxes, ha='center')
    label_panels(axes, (('training step', 'test accuracy',
                         'Test accuracy'),
                        ('training step', 'R_IG = ‖∇L‖² / m (training batches)',
                         'R_IG over training')),
                 f'CIFAR-10 ResNet, EGR mu = {EGR_COEFFICIENT:g}')


def plot_synthetic(readings, path, probe_budgets=()):
  """Validation MSE, NFE to tolerance and rho(J_f(z*)) per gamma and reading;
  `probe_budgets` (the runs' `probe.max_iter`) are drawn on the NFE panel."""
  panels = (('validation_mse', 'validation MSE', 'Fit per reading (3 seeds)'),
            ('nfe_to_tolerance', 'NFE to tolerance (validation)',
             'Forward NFE to tolerance'),
            ('spectral_radius', 'rho(J_f(z*)) (validation)',
             'Flatness at the fixed point'))
  with plotting.figure(path, ncols=len(panels), size=(4.6, 3.8)) as (fig, axes):
    for k, (folder, reading) in enumerate(readings.items()):
      gammas = sorted(reading['by_gamma'], key=float)
      for i, g in enumerate(gammas):
        cell = reading['by_gamma'][g]
        x = np.full(len(cell['validation_mse']), i + 0.2 * (k - 1))
        for ax, (key, _, _) in zip(axes, panels):
          ax.scatter(x, cell[key], color=f'C{k}', s=14,
                     label=folder.replace('synth_', '') if i == 0 else None)
    axes[0].axhline(NOISE_FLOOR, color='k', ls=':', label='noise floor')
    for ax, (_, ylabel, title) in zip(axes, panels):
      ax.set_xticks(range(len(gammas)), gammas)
      ax.set_xlabel('Jacobian weight gamma')
      ax.set_yscale('log')
      ax.set_ylabel(ylabel)
      ax.set_title(f'Synthetic task: {title}', fontsize='medium')
      ax.legend(fontsize='small')
      ax.grid(alpha=0.3)
    for value in sorted(b for b in probe_budgets if b is not None):
      plotting.budget(axes[1], value, 'probe max_iter')


def copy_synthetic_surfaces(runs: str, figures: str) -> None:
  """Each reading's surface figure (seed 0, the smallest and largest gamma:
  f(z; x), the plane z_out = z and z*(x), drawn by the sweep itself) into
  figures/repro_synthetic_surface_<reading>.png."""
  for folder in SYNTHETIC_READINGS:
    source = os.path.join(runs, folder, 'surface.png')
    if not os.path.exists(source):
      raise FileNotFoundError(f'{source} is missing: the synthetic sweep in '
                              f'{os.path.join(runs, folder)} did not finish.')
    shutil.copyfile(source, os.path.join(figures, surface_figure(folder)))


def surface_figure(folder: str) -> str:
  return f'repro_synthetic_surface_{folder.replace("synth_", "")}.png'


def plot_mdeq(per_run, config, path):
  """Accuracy at fixed forward budgets (the training budget `deq.forward.max_iter`
  marked), NFE to tolerance (the probe's budget `probe.max_iter` drawn), rho
  and accuracy against time."""
  with plotting.figure(path, ncols=2, nrows=2, size=(5.0, 3.4)) as (fig, axes):
    for name, r in per_run.items():
      style = dict(color='C0' if r['label'] == 'JR' else 'C1',
                   ls='-' if r['seed'] == 0 else '--', label=name)
      budgets = r['accuracy_at_nfe']['accuracy']
      axes[0, 0].plot([int(b) for b in budgets], list(budgets.values()),
                      marker='o', **style)
      ev = [e for e in r['evals'] if 'probe_nfe_to_tol' in e]
      axes[0, 1].plot([e['step'] for e in ev], [e['probe_nfe_to_tol'] for e in ev],
                      marker='o', **style)
      ev_rho = [e for e in ev if 'probe_spectral_radius' in e]
      axes[1, 0].plot([e['step'] for e in ev_rho],
                      [e['probe_spectral_radius'] for e in ev_rho], marker='o', **style)
      axes[1, 1].plot([e['train_wall_time'] / 60 for e in ev],
                      [e['accuracy'] for e in ev], marker='o', **style)
    budgets = plotting.solver_budgets(config)
    plotting.budget(axes[0, 0], budgets['forward_nfe'], 'forward max_iter', axis='x')
    plotting.budget(axes[0, 1], budgets['probe_nfe_to_tol'], 'probe max_iter')
    labels = (('forward NFE budget', 'test accuracy',
               'Accuracy at a fixed forward budget'),
              ('training step', 'NFE to relative residual 1e-3',
               'NFE to tolerance over training'),
              ('training step', 'rho(J_f(z*))', 'Spectral radius over training'),
              ('training wall time (min)', 'test accuracy', 'Accuracy against time'))
    label_panels(axes, labels, 'MDEQ small, CIFAR-10')


def plot_wt2(per_run, config, path):
  """Perplexity over training, forward NFE (the training budget
  `deq.forward.max_iter` drawn), residual, perplexity at fixed budgets (the
  training budget marked)."""
  with plotting.figure(path, ncols=2, nrows=2, size=(5.0, 3.4)) as (fig, axes):
    for k, (label, r) in enumerate(per_run.items()):
      style = dict(color=f'C{k}', label=label)
      ev = [e for e in r['evals'] if e['step'] > config.deq.pretrain_steps]
      axes[0, 0].plot([e['step'] for e in ev], [e['ppl'] for e in ev], marker='o',
                      **style)
      steps = [t['step'] for t in r['train']]
      axes[0, 1].plot(steps, [t['forward_nfe'] for t in r['train']], **style)
      axes[1, 0].plot(steps, [t['forward_rel_residual'] for t in r['train']], **style)
      budgets = r['ppl_at_nfe']['ppl']
      axes[1, 1].plot([int(b) for b in budgets], list(budgets.values()), marker='o',
                      **style)
    forward = plotting.solver_budgets(config)['forward_nfe']
    plotting.budget(axes[0, 1], forward, 'forward max_iter')
    plotting.budget(axes[1, 1], forward, 'forward max_iter', axis='x')
    axes[1, 0].set_yscale('log')
    axes[1, 1].set_yscale('log')
    labels = (('training step', 'validation perplexity (first batches)',
               'Perplexity over training'),
              ('training step', 'forward NFE (training)', 'Forward NFE over training'),
              ('training step', 'forward relative residual', 'Residual at the budget'),
              ('forward NFE budget', 'validation perplexity',
               'Perplexity at a fixed budget (end of training)'))
    label_panels(axes, labels, 'DEQ-Transformer, WikiText-2')


# --- the report -------------------------------------------------------------


# The report's sections in order: name -> (runs, figures) -> (claims, values).
SECTIONS = {'two_parameter': two_parameter_claims, 'mnist': mnist_claims,
            'egr': egr_claims, 'synthetic': synthetic_claims,
            'mdeq': mdeq_claims, 'wikitext2': wt2_claims, 'memory': memory_claims}


def build_report(runs: str, out: str,
                 sections: Sequence[str] | None = None) -> dict[str, Any]:
  """Reads the runs under `runs`; writes OUT/reproduction.{json,md} and figures.

  `sections` (names of SECTIONS; None: all) rebuilds only those sections and
  takes the others' rows as they stand in OUT/reproduction.json: a run that
  continues over several sittings updates its row without the other runs
  being on this machine.
  """
  unknown = sorted(set(sections or ()) - set(SECTIONS))
  if unknown:
    raise ValueError(f'unknown report sections {unknown}: choose from {list(SECTIONS)}.')
  previous = None if sections is None else read_json(os.path.join(out, 'reproduction.json'))
  figures = os.path.join(out, 'figures')
  os.makedirs(figures, exist_ok=True)
  claims, values = [], {}
  for name, make in SECTIONS.items():
    if previous is None or name in sections:
      more, values[name] = make(runs, figures)
      claims += [dict(c, section=name) for c in more]
    else:
      claims += [c for c in previous['claims'] if c['section'] == name]
      values[name] = previous['values'][name]
  report = dict(claims=claims, values=values, verdicts=VERDICTS)
  with open(os.path.join(out, 'reproduction.json'), 'w') as f:
    json.dump(report, f, indent=1, default=float)
  with open(os.path.join(out, 'reproduction.md'), 'w') as f:
    f.write(markdown(claims))
  return report


PAPERS = {
    'BD21': 'Implicit gradient regularisation (Barrett & Dherin, ICLR 2021)',
    'BKK21': 'Jacobian regularisation of DEQs (Bai, Koltun & Kolter, ICML 2021)',
}
FIGURES = {  # paper -> (file, caption)
    'BD21': [('repro_mnist_grid.png', None), ('repro_egr.png', None)],
    'BKK21': [('repro_synthetic.png', None)] + [
        (surface_figure(folder), f'Synthetic task, {reading}: f(z; x) and '
         'z*(x) at seed 0 for the smallest and largest gamma.')
        for folder, reading in SYNTHETIC_READINGS.items()] + [
        ('repro_mdeq.png', None), ('repro_wt2.png', None)],
}


SCALE_NOTE = """\
Every run here is far smaller than the papers' (the "scale" column says
exactly what ran), so a verdict says what holds at this scale and nothing
about the papers' own figures. Not run at all: WikiText-103 and ImageNet
(no GPU; the configurations and the code paths are tested). The CIFAR-10
ResNets of the EGR row (20 epochs, weight decay 5e-4 in both arms: without
it the plain ResNet ended at 84.5% and 84.2%, short of its 85% target) are
the exception to the hour per run: about 2.6 h each for the plain runs (one
core each) and over 3 h each with EGR (both cores). They were stopped and
resumed from the checkpoints kept in `reproduction_runs/`; while any of the
four is unfinished, that row says how far each got and what a step costs.
The MNIST grid is the full
width x learning-rate grid on a 10,240-image training subset with a step cap,
the MDEQ runs are about three epochs, and the DEQ-Transformer runs are over an hour
of wall time on a shared core each; BUILD_NOTES.md ("Reproduction report")
says why each was cut where it was."""


def markdown(claims: Sequence[Mapping[str, Any]]) -> str:
  """The report's tables (generated; the reading of each row is in its `why`)."""
  lines = [
      '# Reproduction report',
      '',
      'Each claim of the two papers, measured by jreg at a scale this 2-core CPU '
      'runs (at most about an hour per run). Generated by '
      '`python -m experiments.reproduction --runs=runs/repro --out=docs` from '
      'the runs whose commands are listed in BUILD_NOTES.md ("Reproduction '
      'report"), the EGR row from `reproduction_runs/` (`--runs=reproduction_runs '
      '--sections=egr`); every number is in `docs/reproduction.json`. Verdicts: '
      + ', '.join(f'*{v}*' for v in VERDICTS) + '; the rule for each is in '
      'its "why". No run was tuned to match the paper.',
      '',
      'Counts: ' + ', '.join(
          f'{sum(c["verdict"] == v for c in claims)} {v}' for v in VERDICTS) + '.',
  ]
  lines += ['', '## Scale', '', SCALE_NOTE]
  for paper, title in PAPERS.items():
    lines += ['', f'## {title}', '',
              '| source | claim | paper | jreg (measured) | scale | verdict | why |',
              '| --- | --- | --- | --- | --- | --- | --- |']
    for c in claims:
      if c['paper'] == paper:
        cells = [c[k] for k in ('source', 'claim', 'paper_figure', 'measured',
                                'scale')] + [f'**{c["verdict"]}**', c['why']]
        lines.append('| ' + ' | '.join(str(x).replace('|', '/') for x in cells) + ' |')
    lines.append('')
    for name, caption in FIGURES[paper]:
      lines += ([caption, ''] if caption else []) + [f'![{name}](figures/{name})', '']
  return '\n'.join(lines) + '\n'


def define_flags():
  flags.DEFINE_string('runs', 'runs/repro', 'Folder holding the finished runs.')
  flags.DEFINE_string('out', 'docs', 'Where reproduction.{md,json} and figures go.')
  flags.DEFINE_bool('measure_egr_cost', False, 'Only time the ResNet-20 EGR step '
                    'and write RUNS/egr_cost.json.')
  flags.DEFINE_list('sections', None, 'Rebuild only these sections of the report '
                    f'({", ".join(SECTIONS)}), the others as they stand in '
                    'OUT/reproduction.json (default: all, from every run).')


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    if f.measure_egr_cost:
      os.makedirs(f.runs, exist_ok=True)
      cost = egr_step_cost()
      with open(os.path.join(f.runs, 'egr_cost.json'), 'w') as out:
        json.dump(cost, out, indent=1)
      print(json.dumps(cost))
      return
    report = build_report(f.runs, f.out, f.sections)
  except (FileNotFoundError, ValueError, cli.ConfigError, checkpoint_lib.CheckpointError) as error:
    raise SystemExit(f'reproduction: {error}') from None
  counts = {v: sum(c['verdict'] == v for c in report['claims']) for v in VERDICTS}
  print(f'{len(report["claims"])} claims: {counts}; wrote {f.out}/reproduction.md')


if __name__ == '__main__':
  define_flags()
  app.run(main)
