"""Every experiment's config: presets, overrides, refusals, one naming scheme.

Parameterised over every config file in experiments/configs/, so an experiment
added later is checked too. The command-line form of the same refusals runs
once per experiment in a subprocess (`--config.no_such_key=1`).
"""
import concurrent.futures
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from experiments import quickstart
from jreg import cli

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'experiments' / 'configs'
NAMES = sorted(p.stem for p in CONFIGS.glob('*.py') if p.stem != '__init__')
EXPERIMENTS = [name for name, _, _ in quickstart.EXPERIMENTS]
# Spellings the naming scheme replaces (experiments/configs/__init__.py).
FORBIDDEN = {'epochs', 'num_epochs', 'data_dir', 'dataset_dir', 'data_source',
             'dataset_source', 'lr', 'jacobian_prob', 'jacobian_probability',
             'jacobian_weight', 'preset', 'quickstart', 'train_steps'}

# Out-of-range values of configs that have none of the shared keys.
OWN_RANGES = {'igr_two_parameter': [('horizon', -1.0), ('rk4_substeps', 1)]}


def _flat(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _flat(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def test_every_experiment_has_a_config_file():
  assert set(EXPERIMENTS) <= set(NAMES)


@pytest.mark.parametrize('name', NAMES)
def test_presets_load_validate_and_follow_the_naming_scheme(name):
  for preset in cli.PRESETS:
    config = cli.get_config(name, preset)
    assert isinstance(config, ml_collections.ConfigDict)
    keys = dict(_flat(config))
    for key in keys:
      leaf = key.split('.')[-1]
      group = key.split('.')[0]
      assert leaf not in FORBIDDEN or group == 'sweep', (name, key)
    if 'data' in config and 'source' in config.data:
      assert config.data.source == 'auto' and config.data.dir is None, name
  with pytest.raises(cli.ConfigError, match='preset'):
    cli.get_config(name, 'huge')


@pytest.mark.parametrize('name', NAMES)
def test_overrides_reach_nested_keys_and_bad_values_are_refused(name):
  config = cli.get_config(name, 'quickstart')
  keys = dict(_flat(config))
  # Every key can be set to its own value (nested ones through dotted paths).
  changed = cli.get_config(name, 'quickstart', {k: v for k, v in keys.items()
                                               if v is not None})
  assert dict(_flat(changed)) == keys
  with pytest.raises(cli.ConfigError, match='no_such_key'):
    cli.get_config(name, 'quickstart', {'no_such_key': 1})
  with pytest.raises(cli.ConfigError, match='nested.no_such_key'):
    cli.get_config(name, 'quickstart', {'nested.no_such_key': 1})
  for key, value in keys.items():  # a value of the wrong type, for each key
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
      bad = 1.5 if isinstance(value, str) else 'not a number'
      with pytest.raises(cli.ConfigError, match=key):
        cli.get_config(name, 'quickstart', {key: bad})
  out_of_range = [(key, bad) for key, bad in
                  (('seed', -1), ('num_steps', 0), ('learning_rate', -1.0),
                   ('jacobian.probability', 1.5), ('jacobian.weight', -1.0),
                   ('log_every', 0), ('parallel', 'everywhere'),
                   ('data.source', 'ftp')) if key in keys]
  out_of_range += OWN_RANGES.get(name, [])
  assert out_of_range, f'{name} has none of the shared keys'
  for key, bad in out_of_range:
    with pytest.raises(cli.ConfigError, match=key.split('.')[-1]):
      cli.get_config(name, 'quickstart', {key: bad})


def _unknown_key_command(name, workdir):
  return subprocess.run(
      [sys.executable, '-m', f'experiments.{name}', f'--workdir={workdir}',
       '--config.no_such_key=1'], capture_output=True, text=True, timeout=300)


def test_unknown_key_on_the_command_line_is_one_sentence_for_every_experiment(
    tmp_path):
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = dict(zip(EXPERIMENTS, pool.map(
        lambda name: _unknown_key_command(name, tmp_path / name), EXPERIMENTS)))
  for name, result in results.items():
    assert result.returncode != 0, name
    assert 'Traceback' not in result.stderr, (name, result.stderr[-2000:])
    fatal = [line for line in result.stderr.splitlines() if 'FATAL' in line]
    assert len(fatal) == 1 and "no key 'no_such_key'" in fatal[0], (
        name, result.stderr[-2000:])
    assert not (tmp_path / name).exists(), name  # nothing written


def test_sweeps_expand_to_named_complete_run_configs():
  from jreg.tasks import runs  # pylint: disable=g-import-not-at-top
  config = cli.get_config('deq_synthetic', 'quickstart', {
      'sweep.jacobian_weight': (0.0, 0.5), 'sweep.seed': (1, 2)})
  with config.sweep.unlocked():
    config.sweep.optimizer_weight_decay = (0.1,)   # GROUP_LEAF of a group key
  expanded = runs.expand(config)
  # Named by the sweep keys in sorted order (a ConfigDict's order).
  assert [run.name for run in expanded] == [
      'jacobian_weight=0,optimizer_weight_decay=0.1,seed=1',
      'jacobian_weight=0,optimizer_weight_decay=0.1,seed=2',
      'jacobian_weight=0.5,optimizer_weight_decay=0.1,seed=1',
      'jacobian_weight=0.5,optimizer_weight_decay=0.1,seed=2']
  last = expanded[-1].config
  assert (last.jacobian.weight, last.seed, last.optimizer.weight_decay) == (
      0.5, 2, 0.1)
  assert 'sweep' not in last and 'sweep' in config  # the input is unchanged
  with config.sweep.unlocked():
    config.sweep.no_such_key = (1,)
  with pytest.raises(ValueError, match='sweep.no_such_key names no key'):
    runs.expand(config)
