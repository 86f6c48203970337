"""The reproduction report (experiments/reproduction.py): its verdict rules on
hand cases, its fixed-budget evaluations against the runs' own evaluations,
and the whole report built from real quickstart runs."""
import json
import os
import shutil

import numpy as np
import pytest

from experiments import deq_cifar10
from experiments import deq_synthetic
from experiments import deq_wikitext
from experiments import egr_cifar10
from experiments import igr_mnist_sweep
from experiments import igr_two_parameter
from experiments import reproduction as repro
from jreg import cli
from jreg import metrics as metrics_lib


def test_spearman_on_hand_cases():
  assert repro.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert repro.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # Monotone but not linear: ranks, not values.
  assert repro.spearman([1, 2, 3, 4], [1, 8, 27, 1000]) == pytest.approx(1.0)
  # Ties share their mean rank: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4).
  expected = np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1]
  assert repro.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(expected)
  assert np.isnan(repro.spearman([1, 2], [2, 1]))  # too few points


def test_training_wall_time_adds_the_segments_of_a_restarted_run():
  assert repro.training_wall_time([10.0, 20.0, 5.0, 15.0]) == 35.0
  assert repro.training_wall_time([10.0, 20.0]) == 20.0
  assert repro.training_wall_time([]) == 0.0


def test_verdict_rules():
  assert repro.verdict_order(1.04, 1.0) == 'reproduced'
  assert repro.verdict_order(1.3, 1.0) == 'not reproduced'
  assert repro.verdict_monotone([3, 2, 1]) == 'reproduced'
  assert repro.verdict_monotone([3, 3.5, 1]) == 'trend reproduced'
  assert repro.verdict_monotone([1, 2, 3]) == 'not reproduced'
  assert repro.verdict_monotone([1, 2, 3], decreasing=False) == 'reproduced'
  assert repro.verdict_correlation(0.8, +1) == 'reproduced'
  assert repro.verdict_correlation(0.5, +1) == 'trend reproduced'
  assert repro.verdict_correlation(0.5, -1) == 'not reproduced'
  assert repro.verdict_correlation(float('nan'), +1) == 'not testable here'
  assert repro.verdict_ratio(2.1, 1.8, 3.5, 1.0) == 'reproduced'
  assert repro.verdict_ratio(1.3, 1.8, 3.5, 1.0) == 'trend reproduced'
  assert repro.verdict_ratio(0.9, 1.8, 3.5, 1.0) == 'not reproduced'
  assert repro.verdict_ratio(1.0, 1.8, 3.5, 1.0) == 'not reproduced'  # no change
  assert repro.verdict_ratio(1.5, 1.2, 1.35, 1.0) == 'trend reproduced'


@pytest.fixture(scope='module')
def runs(tmp_path_factory, shared_data):
  """A runs folder laid out as the report reads it, from quickstart runs
  (one trained run copied where the report expects several)."""
  root = tmp_path_factory.mktemp('repro_runs')

  def execute(name, run, workdir, **overrides):
    if name not in ('igr_two_parameter', 'deq_synthetic'):  # these read no files
      overrides['data.dir'] = str(shared_data)
    config = cli.get_config(name, 'quickstart', overrides)
    return cli.execute(name, run, config, str(root / workdir))

  execute('igr_two_parameter', igr_two_parameter.run, 'igr_two_parameter',
          horizon=5.0, **{'endpoints.learning_rates': (0.01, 0.04)})
  execute('igr_mnist_sweep', igr_mnist_sweep.run, 'mnist_grid', eval_every=20,
          stop_train_accuracy=0.5, **{'sweep.regularizer_coefficient': (0.0,)})
  execute('deq_synthetic', deq_synthetic.run, 'synth_literal', num_steps=40,
          **{'sweep.seed': (0, 1)})
  for folder in list(repro.SYNTHETIC_READINGS)[1:]:
    shutil.copytree(root / 'synth_literal', root / folder)
  execute('deq_cifar10', deq_cifar10.run, 'mdeq_jr_s0')
  for folder in list(repro.MDEQ_RUNS.values())[1:]:
    shutil.copytree(root / 'mdeq_jr_s0', root / folder)
  execute('deq_wikitext', deq_wikitext.run, 'wt2_jr')
  shutil.copytree(root / 'wt2_jr', root / 'wt2_nojr')
  execute('egr_cifar10', egr_cifar10.run, repro.EGR_WORKDIR)  # seed 0, plain and EGR
  for (label, seed), name in repro.EGR_RUNS.items():
    if seed:
      shutil.copytree(root / repro.EGR_WORKDIR / 'runs' / repro.EGR_RUNS[(label, 0)],
                      root / repro.EGR_WORKDIR / 'runs' / name)
  (root / 'egr_cost.json').write_text(json.dumps(dict(
      model='resnet20', batch_size=128, num_params=269722,
      seconds_per_step_plain=0.5, seconds_per_step_egr=1.5, egr_over_plain=3.0)))
  memory = {name: {'memory_bytes': size} for name, size in (
      ('mdeq', 100), ('mdeq_jr', 128), ('deqtx', 200), ('deqtx_jr', 210))}
  (root / 'memory.json').write_text(json.dumps(dict(
      cases=memory, memory_against_forward_nfe={'mdeq_jr': {
          '10': {'memory_bytes': 50e6}, '40': {'memory_bytes': 75e6}}})))
  return root


def test_mdeq_accuracy_at_its_own_budget_is_the_runs_evaluation(runs):
  """Restored from the checkpoint and read at the run's evaluation budget,
  the accuracy is the one the run logged at its last evaluation."""
  workdir = str(runs / 'mdeq_jr_s0')
  config = repro.run_config(workdir)
  budget = config.deq.eval_max_iter
  out = repro.mdeq_accuracy_at_budgets(
      [workdir], budgets=(1, budget), examples=config.data.eval_examples)
  final = repro.evals(metrics_lib.read_history(workdir))[-1]
  row = out['mdeq_jr_s0']
  assert row['step'] == config.num_steps
  assert row['accuracy'][str(budget)] == pytest.approx(final['accuracy'], abs=1e-9)
  assert row['forward_nfe'] == {'1': 1.0, str(budget): final['forward_nfe']}


def test_wt2_perplexity_at_its_own_budget_is_the_runs_evaluation(runs):
  workdir = str(runs / 'wt2_jr')
  config = repro.run_config(workdir)
  out = repro.wt2_perplexity_at_budgets([workdir], budgets=(2,),
                                        max_batches=config.eval_max_batches)
  final = repro.evals(metrics_lib.read_history(workdir))[-1]
  row = out['wt2_jr']
  budget = str(config.deq.forward.max_iter)
  assert sorted(row['ppl'], key=int) == ['2', budget]  # the training budget is added
  assert row['ppl'][budget] == pytest.approx(final['ppl'], rel=1e-6)
  assert row['forward_nfe']['2'] == 2.0


def test_report_has_a_row_for_every_claim(runs, tmp_path, monkeypatch):
  monkeypatch.setattr(repro, 'MDEQ_BUDGETS', (1, 2))
  monkeypatch.setattr(repro, 'MDEQ_BUDGET_EXAMPLES', 32)
  monkeypatch.setattr(repro, 'WT2_BUDGETS', (2,))
  monkeypatch.setattr(repro, 'WT2_BUDGET_BATCHES', 2)
  report = repro.build_report(str(runs), str(tmp_path))
  claims = report['claims']
  assert len(claims) == 16
  for c in claims:
    assert c['verdict'] in repro.VERDICTS
    assert c['measured'] and c['scale'] and c['paper_figure'] and c['why']
  by_source = {(c['paper'], c['source']): c for c in claims}
  assert {p for p, _ in by_source} == {'BD21', 'BKK21'}
  # The fabricated memory figures give +28% (inside 25-30%) and a growing
  # memory in NFE.
  memory = [c for c in claims if 'memory' in c['claim']]
  assert [c['verdict'] for c in memory] == ['reproduced', 'not reproduced']
  assert '+28.0%' in memory[0]['measured']
  # EGR: the finished quickstart runs are judged against their own logs.
  egr = by_source[('BD21', 'Section 6, Fig. 3')]
  runs_logged = report['values']['egr']['runs']
  plain, regularised = (runs_logged[f'{label}, seed 0']['test_accuracy'][-1][1]
                        for label in ('plain', 'EGR'))
  assert f'{regularised:.3f} vs {plain:.3f}' in egr['measured']
  assert egr['verdict'] != 'not testable here' and '(not met' in egr['why']
  final = {key: run['test_accuracy'][-1][1] for key, run in runs_logged.items()}
  higher = sum(final[f'EGR, seed {s}'] > final[f'plain, seed {s}'] for s in (0, 1))
  lower = sum(runs_logged[f'EGR, seed {s}']['final_r_ig'] <
              runs_logged[f'plain, seed {s}']['final_r_ig'] for s in (0, 1))
  assert f'higher test accuracy in {higher} of 2 seeds and the lower R_IG in {lower} ' \
      'of 2' in egr['why']
  assert egr['verdict'] == ('reproduced' if higher == lower == 2 else 'not reproduced'
                            if regularised <= plain else 'trend reproduced')
  # Identical runs in both arms: no NFE saving, and the verdict says so.
  nfe = by_source[('BKK21', 'Table 3')]
  assert nfe['verdict'] == 'not reproduced' and '1.00x fewer' in nfe['measured']
  # Files: the JSON, the tables (one row per claim) and the figures they show.
  with open(tmp_path / 'reproduction.json') as f:
    assert json.load(f)['claims'] == json.loads(json.dumps(claims, default=float))
  text = (tmp_path / 'reproduction.md').read_text()
  assert sum(line.startswith('| ') and '**' in line
             for line in text.splitlines()) == len(claims)
  for figures in repro.FIGURES.values():
    for name, caption in figures:
      assert f'(figures/{name})' in text and (caption is None or caption in text)
      assert os.path.getsize(tmp_path / 'figures' / name) > 10_000
  # The cached fixed-budget evaluations are reused: a second build is the same.
  again = repro.build_report(str(runs), str(tmp_path / 'again'))
  assert json.dumps(again['claims']) == json.dumps(claims)


def test_egr_row_waits_for_unfinished_runs(runs, tmp_path):
  """Runs still training (a missing run, one stopped early) leave the row
  'not testable here', with each run's progress and the projected cost."""
  shutil.copy(runs / 'egr_cost.json', tmp_path)
  shutil.copytree(runs / repro.EGR_WORKDIR, tmp_path / repro.EGR_WORKDIR)
  folder = tmp_path / repro.EGR_WORKDIR / 'runs'
  shutil.rmtree(folder / repro.EGR_RUNS[('EGR', 1)])
  metrics = folder / repro.EGR_RUNS[('plain', 1)] / 'metrics.jsonl'
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  metrics.write_text(''.join(json.dumps(r) + '\n' for r in records
                             if r['split'] == 'train'))  # no final evaluation yet
  (tmp_path / 'figures').mkdir()
  [row], values = repro.egr_claims(str(tmp_path), str(tmp_path / 'figures'))
  assert row['verdict'] == 'not testable here'
  assert f'plain seed 1: step {records[-1]["step"]} of' in row['measured']
  assert 'EGR seed 1' not in row['measured'] and '3.0x' in row['measured']
  assert values['cost']['projected_cpu_hours_2_seeds'] == pytest.approx(
      2 * 390 * repro.EGR_EPOCHS * 2.0 / 3600)
  assert os.path.getsize(tmp_path / 'figures' / 'repro_egr.png') > 10_000
  assert 'weight decay 0 in both arms' in row['scale']
  # Arms trained with different recipes are refused, naming the difference.
  config_file = folder / repro.EGR_RUNS[('plain', 1)] / 'config.json'
  saved = config_file.read_text()
  changed = json.loads(saved)
  changed['optimizer']['weight_decay'] = 5e-4
  config_file.write_text(json.dumps(changed))
  with pytest.raises(ValueError, match=r'different recipes \(optimizer of plain seed 1'):
    repro.egr_claims(str(tmp_path), str(tmp_path / 'figures'))
  config_file.write_text(saved)

  # With only these runs on the machine, the report's EGR section is rebuilt
  # and every other row is kept as the previous report has it.
  previous = dict(verdicts=repro.VERDICTS, claims=[], values={})
  for name in repro.SECTIONS:
    previous['claims'] += [dict(repro.claim(
        'BD21', f'{name} {i}', 'a claim', 'a figure', 'a measurement', 'a scale',
        'reproduced', 'a reason'), section=name) for i in range(2)]
    previous['values'][name] = {'from': 'the previous report'}
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'reproduction.json').write_text(json.dumps(previous))
  report = repro.build_report(str(tmp_path), str(out), sections=['egr'])
  kept = [c for c in previous['claims'] if c['section'] != 'egr']
  assert [c for c in report['claims'] if c['section'] != 'egr'] == kept
  assert [c['section'] for c in report['claims']] == [
      c['section'] for c in previous['claims'] if c['section'] != 'egr'
      or c['source'].endswith('0')]  # the new EGR row stands where the old ones did
  assert dict(row, section='egr') in report['claims']
  assert report['values']['egr']['cost'] == values['cost']
  assert report['values']['mdeq'] == {'from': 'the previous report'}
  assert json.loads((out / 'reproduction.json').read_text())['claims'] == json.loads(
      json.dumps(report['claims'], default=float))
  assert (out / 'reproduction.md').read_text().count('**reproduced**') == len(kept)
  with pytest.raises(ValueError, match='unknown report sections'):
    repro.build_report(str(tmp_path), str(out), sections=['egr', 'mnist_grid'])
  with pytest.raises(FileNotFoundError, match='BUILD_NOTES.md'):
    repro.build_report(str(tmp_path), str(tmp_path / 'empty'), sections=['egr'])


def test_missing_run_is_one_sentence(tmp_path):
  with pytest.raises(FileNotFoundError, match='BUILD_NOTES.md'):
    repro.build_report(str(tmp_path), str(tmp_path / 'out'))
