"""Cluster launches: SLURM -> jax.distributed settings, sweeps, gathering.

The SLURM environment is faked (monkeypatched variables), the job array is
run by executing the written sbatch script once per array index, and the
points are a stub experiment that writes `config.json` / `results.json` the
way experiments do.
"""
import csv
import json
import os
import pathlib
import shlex
import subprocess
import sys
import textwrap

import jax
import pytest

from jreg import distributed
from launch import gather
from launch import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]

# -- SLURM -> jax.distributed.initialize -----------------------------------------


@pytest.mark.parametrize('node_list, host', [
    ('node07', 'node07'),
    ('node07,node09', 'node07'),
    ('gpu[003-008,011],cpu1', 'gpu003'),
    ('gpu[011,003-008]', 'gpu011'),
    ('rack[2-3]-n[01-04],x', 'rack2-n01'),
])
def test_first_host(node_list, host):
  assert distributed.first_host(node_list) == host


def test_first_host_rejects_malformed_lists():
  for node_list in ('', 'gpu[003-004', ',node1'):
    with pytest.raises(ValueError, match='host list'):
      distributed.first_host(node_list)


def _slurm_env(**overrides):
  """Task 13 of `sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8`."""
  env = {'SLURM_JOB_ID': '123456', 'SLURM_NTASKS': '32',
         'SLURM_PROCID': '13', 'SLURM_LOCALID': '5', 'SLURM_NODEID': '1',
         'SLURM_NNODES': '4', 'SLURM_STEP_TASKS_PER_NODE': '8(x4)',
         'SLURM_JOB_NODELIST': 'gpu[003-006]',
         'SLURM_STEP_NODELIST': 'gpu[003-006]',
         'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7'}
  env.update(overrides)
  return {key: value for key, value in env.items() if value is not None}


def test_slurm_one_process_per_gpu():
  settings = distributed.slurm_settings(_slurm_env())
  # JAX's SLURM port rule: 65535 - 2**12 + 1 + job id mod 2**12.
  assert settings == {'coordinator_address': f'gpu003:{61440 + 123456 % 4096}',
                      'num_processes': 32, 'process_id': 13,
                      'local_device_ids': [5]}


def test_slurm_one_process_per_node_drives_every_gpu():
  env = _slurm_env(SLURM_NTASKS='4', SLURM_PROCID='1', SLURM_LOCALID='0',
                   SLURM_STEP_TASKS_PER_NODE='1(x4)')
  settings = distributed.slurm_settings(env)
  assert settings['local_device_ids'] is None
  assert (settings['num_processes'], settings['process_id']) == (4, 1)


def test_slurm_bound_gpu_and_other_task_layouts():
  # --gpus-per-task=1: SLURM shows each task only its own GPU.
  bound = _slurm_env(CUDA_VISIBLE_DEVICES='5')
  assert distributed.slurm_settings(bound)['local_device_ids'] is None
  # Uneven layout '8(x2),4': node 2 runs 4 tasks, still one GPU each.
  uneven = _slurm_env(SLURM_STEP_TASKS_PER_NODE='8(x2),4', SLURM_NODEID='2',
                      SLURM_LOCALID='3', SLURM_NTASKS='20', SLURM_PROCID='19')
  assert distributed.slurm_settings(uneven)['local_device_ids'] == [3]
  # Outside srun only the job's node list exists; the port can be forced.
  job_only = _slurm_env(SLURM_STEP_NODELIST=None,
                        SLURM_JOB_NODELIST='a12,b[1-2]',
                        JREG_COORDINATOR_PORT='7777')
  assert distributed.slurm_settings(job_only)['coordinator_address'] == (
      'a12:7777')


def test_slurm_settings_outside_slurm_is_one_sentence():
  with pytest.raises(ValueError) as error:
    distributed.slurm_settings(_slurm_env(SLURM_PROCID=None,
                                          SLURM_STEP_NODELIST=None,
                                          SLURM_JOB_NODELIST=None))
  message = str(error.value)
  assert 'SLURM_PROCID' in message and 'srun' in message
  assert '\n' not in message


@pytest.fixture
def initialize_calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of making them."""
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda *args, **kwargs: calls.append((args, kwargs)))
  monkeypatch.setattr(jax.config, 'update', lambda *args: None)
  for name in ('JREG_COORDINATOR_ADDRESS', 'JREG_NUM_PROCESSES',
               'JREG_PROCESS_ID'):
    monkeypatch.delenv(name, raising=False)
  return calls


def test_initialize_from_slurm(monkeypatch, initialize_calls):
  for key, value in _slurm_env().items():
    monkeypatch.setenv(key, value)
  distributed.initialize(slurm=True)
  assert initialize_calls == [((), {
      'coordinator_address': f'gpu003:{61440 + 123456 % 4096}',
      'num_processes': 32, 'process_id': 13, 'local_device_ids': [5],
      'cluster_detection_method': 'deactivate'})]


def test_initialize_tpu_pod_form_and_explicit(initialize_calls):
  distributed.initialize()                         # single host: nothing
  assert initialize_calls == []
  distributed.initialize(auto=True)                # TPU pod: no arguments
  assert initialize_calls == [((), {})]
  distributed.initialize('host0:1234', 2, 1)
  assert initialize_calls[-1] == ((), {
      'coordinator_address': 'host0:1234', 'num_processes': 2,
      'process_id': 1, 'local_device_ids': None,
      'cluster_detection_method': 'deactivate'})
  with pytest.raises(ValueError, match='give one'):
    distributed.initialize(auto=True, slurm=True)
  with pytest.raises(ValueError, match='needs all of'):
    distributed.initialize('host0:1234')


# -- sweeps -------------------------------------------------------------------

_STUB = '''
"""A stand-in experiment: --workdir, --config, --config.KEY=VALUE."""
import json, os, sys

args = dict(arg[2:].split('=', 1) for arg in sys.argv[1:])
workdir = args.pop('workdir')
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(os.path.dirname(os.path.dirname(workdir)),
                       'calls.txt'), 'a') as f:
  f.write(os.path.basename(workdir) + '\\n')
config = {'preset': args.pop('config', None), 'model': {'width': 8},
          'optimizer': {'learning_rate': 0.1}, 'data': {'source': 'auto'}}
for key, value in args.items():
  node = config
  *parents, leaf = key[len('config.'):].split('.')
  for parent in parents:
    node = node.setdefault(parent, {})
  node[leaf] = type(node[leaf])(value) if leaf in node else value
if config.get('fail') == '1':
  sys.exit('failing on purpose')
width, rate = config['model']['width'], config['optimizer']['learning_rate']
with open(os.path.join(workdir, 'config.json'), 'w') as f:
  json.dump(config, f)
with open(os.path.join(workdir, 'results.json'), 'w') as f:
  json.dump({'accuracy': width * rate, 'loss': {'final': 1 / width},
             'curve': [1, 2]}, f)
'''


@pytest.fixture
def stub_experiment(tmp_path, monkeypatch):
  """A module `sweep_stub.point` on PYTHONPATH for the points' processes."""
  package = tmp_path / 'modules' / 'sweep_stub'
  package.mkdir(parents=True)
  (package / '__init__.py').write_text('')
  (package / 'point.py').write_text(textwrap.dedent(_STUB))
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      [str(tmp_path / 'modules'), str(REPO)]))
  return 'sweep_stub.point'


def test_plan_names_and_commands(tmp_path):
  planned = sweep.plan(str(tmp_path), 'igr_mnist_sweep',
                       'experiments/configs/igr_mnist_sweep.py:quick',
                       'optimizer.learning_rate=0.01,0.1;config.model.width=64',
                       ['data.source=download'], python='python3')
  assert planned['experiment'] == 'experiments.igr_mnist_sweep'
  names = [p['name'] for p in planned['points']]
  assert names == ['optimizer.learning_rate=0.01,model.width=64',
                   'optimizer.learning_rate=0.1,model.width=64']
  assert planned['points'][1]['command'] == [
      'python3', '-m', 'experiments.igr_mnist_sweep',
      f'--workdir={tmp_path}/points/{names[1]}',
      '--config=experiments/configs/igr_mnist_sweep.py:quick',
      '--config.data.source=download', '--config.optimizer.learning_rate=0.1',
      '--config.model.width=64']
  for bad in ('width', 'width=', '=1'):
    with pytest.raises(sweep.SweepError, match='not of the form'):
      sweep.plan(str(tmp_path), 'x', None, bad)


def test_slurm_array_script_runs_each_point(tmp_path, stub_experiment):
  planned = sweep.plan(str(tmp_path / 's'), stub_experiment, 'c.py:tiny',
                       'model.width=4,8;optimizer.learning_rate=0.5,1.0')
  script = sweep.sbatch_script(
      planned, str(tmp_path / 's'), job_name='jreg-stub', time_limit='02:00:00',
      gpus=1, cpus=8, mem='32G', parallelism=3, partition='gpu',
      account='lab', setup=['export STUB_SETUP=1'], options=['--qos=high'])
  for line in ('#SBATCH --array=0-3%3', '#SBATCH --time=02:00:00',
               '#SBATCH --gpus-per-task=1', '#SBATCH --cpus-per-task=8',
               '#SBATCH --mem=32G', '#SBATCH --partition=gpu',
               '#SBATCH --account=lab', '#SBATCH --requeue',
               f'#SBATCH --output={tmp_path}/s/logs/%A_%a.out',
               '#SBATCH --signal=B:USR1@300', '#SBATCH --qos=high',
               'export STUB_SETUP=1'):
    assert line in script.splitlines(), line
  path = tmp_path / 's' / 'sweep.sbatch'
  path.parent.mkdir(parents=True)
  path.write_text(script)
  # What SLURM does: run the script once per array index.
  for index in range(4):
    result = subprocess.run(
        ['bash', str(path)], capture_output=True, text=True, check=False,
        env=dict(os.environ, SLURM_ARRAY_TASK_ID=str(index),
                 SLURM_JOB_ID=str(1000 + index)))
    assert result.returncode == 0, result.stderr
  calls = (tmp_path / 's' / 'calls.txt').read_text().split()
  assert calls == [p['name'] for p in planned['points']]
  for point in planned['points']:
    config = json.loads(
        (pathlib.Path(point['workdir']) / 'config.json').read_text())
    assert config['preset'] == 'c.py:tiny'
    assert {'model.width': str(config['model']['width']),
            'optimizer.learning_rate': str(
                config['optimizer']['learning_rate'])} == point['overrides']
  # A finished point is not run again.
  subprocess.run(['bash', str(path)], check=True, capture_output=True,
                 env=dict(os.environ, SLURM_ARRAY_TASK_ID='2',
                          SLURM_JOB_ID='2000'))
  assert len((tmp_path / 's' / 'calls.txt').read_text().split()) == 4


def _launch(module, *flags_, check=True):
  result = subprocess.run([sys.executable, '-m', module, *flags_], cwd=REPO,
                          capture_output=True, text=True, check=False)
  if check:
    assert result.returncode == 0, result.stdout + result.stderr
  return result


def test_local_sweep_then_gather(tmp_path, stub_experiment):
  sweep_dir = tmp_path / 'sweep'
  flags_ = [f'--experiment={stub_experiment}', f'--sweep_dir={sweep_dir}',
            '--grid=model.width=4,8,16;optimizer.learning_rate=0.5,1.0',
            '--set=data.source=local', '--executor=local', '--max_parallel=2']
  result = _launch('launch.sweep', *flags_)
  assert 'all 6 points done' in result.stdout
  assert len((sweep_dir / 'calls.txt').read_text().split()) == 6
  _launch('launch.sweep', *flags_)                      # all finished: no runs
  assert len((sweep_dir / 'calls.txt').read_text().split()) == 6
  recorded = json.loads((sweep_dir / 'sweep.json').read_text())
  assert len(recorded['points']) == 6 and recorded['executor'] == 'local'

  result = _launch('launch.gather', f'--sweep_dir={sweep_dir}')
  assert '6 of 6 points finished' in result.stdout
  with open(sweep_dir / 'table.csv') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ['point', 'finished', 'model.width',
                           'optimizer.learning_rate', 'accuracy', 'loss.final']
  for row in rows:
    assert float(row['accuracy']) == pytest.approx(
        int(row['model.width']) * float(row['optimizer.learning_rate']))
  table = json.loads((sweep_dir / 'table.json').read_text())
  assert table['rows'][0]['config']['data.source'] == 'local'
  for name in ('heatmap_accuracy.png', 'heatmap_loss.final.png'):
    assert (sweep_dir / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_local_sweep_failure_is_reported(tmp_path, stub_experiment):
  result = _launch('launch.sweep', f'--experiment={stub_experiment}',
                   f'--sweep_dir={tmp_path}', '--grid=fail=0,1',
                   check=False)
  assert result.returncode != 0
  assert '1 of 2 points failed (fail=1)' in result.stderr
  assert 'failing on purpose' in (tmp_path / 'logs' / 'fail=1.log').read_text()


def test_slurm_dry_run_writes_the_script(tmp_path, stub_experiment):
  result = _launch('launch.sweep', f'--experiment={stub_experiment}',
                   f'--sweep_dir={tmp_path}', '--grid=model.width=4,8',
                   '--executor=slurm', '--dry_run', '--slurm_time=30')
  assert f'sbatch {tmp_path}/sweep.sbatch' in result.stdout
  script = (tmp_path / 'sweep.sbatch').read_text()
  assert '#SBATCH --array=0-1%2' in script and '#SBATCH --time=30' in script
  assert subprocess.run(['bash', '-n', str(tmp_path / 'sweep.sbatch')],
                        check=False).returncode == 0
  bad = _launch('launch.sweep', f'--experiment={stub_experiment}',
                f'--sweep_dir={tmp_path}', '--executor=slurm',
                '--slurm_time=soon', check=False)
  assert bad.returncode != 0 and 'not a SLURM time limit' in bad.stderr


def _docstring_commands():
  """The commands of launch.sweep's docstring (its --help), as argument lists."""
  commands, lines = [], []
  for line in sweep.__doc__.splitlines():
    line = line.strip()
    if lines or line.startswith('python -m launch.'):
      lines.append(line.removesuffix('\\'))
      if not line.endswith('\\'):
        commands.append(shlex.split(' '.join(lines), comments=True))
        lines = []
  return commands


def test_the_help_example_runs_then_gathers(tmp_path):
  local, slurm, gathering = _docstring_commands()
  assert local[:3] == slurm[:3] == ['python', '-m', 'launch.sweep']
  assert gathering[:3] == ['python', '-m', 'launch.gather']
  assert '--executor=local' in local and '--executor=slurm' in slurm
  example_dir = '--sweep_dir=runs/s1'
  assert example_dir in local and example_dir in gathering
  here = f'--sweep_dir={tmp_path / "s1"}'

  def mine(command):
    return [here if arg == example_dir else arg for arg in command[3:]]

  result = _launch('launch.sweep', *mine(local))
  assert 'all 2 points done' in result.stdout
  # The SLURM example is the local one's sweep ('...') on SLURM.
  own = ('--executor=', '--max_parallel=', '--sweep_dir=')
  shared = [arg for arg in mine(local) if not arg.startswith(own)]
  at = slurm.index('...')
  _launch('launch.sweep', *shared, f'--sweep_dir={tmp_path / "slurm"}',
          *slurm[at + 1:], '--dry_run')
  script = (tmp_path / 'slurm' / 'sweep.sbatch').read_text().splitlines()
  assert '#SBATCH --array=0-1%2' in script
  assert '#SBATCH --partition=gpu' in script
  result = _launch('launch.gather', *mine(gathering))
  assert '2 of 2 points finished' in result.stdout
  assert (tmp_path / 's1' / 'validation_mse_vs_learning_rate.png').is_file()


def _refused(tmp_path, *flags_):
  """launch.sweep's refusal: one sentence, exit 1, nothing written."""
  result = _launch('launch.sweep', f'--sweep_dir={tmp_path / "s"}', *flags_,
                   check=False)
  assert result.returncode == 1, result.stdout + result.stderr
  assert result.stderr.startswith('error: ') and result.stderr.count('\n') == 1
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 's').exists()
  return result.stderr


def test_sweep_refuses_a_bad_preset_or_key_before_writing(tmp_path):
  cifar = ['--experiment=deq_cifar10', '--executor=slurm',
           '--config=experiments/configs/deq_cifar10.py:smal']
  message = _refused(tmp_path, *cifar, '--grid=learning_rate=1e-3', '--dry_run')
  assert "unknown preset 'smal'" in message
  cifar[-1] = cifar[-1].replace(':smal', ':small')
  message = _refused(tmp_path, *cifar, '--grid=learning_rat=1e-3')
  assert 'point 1 of 1 (learning_rat=1e-3)' in message
  assert "no key 'learning_rat' (did you mean 'learning_rate'?)" in message


def test_check_uses_the_experiments_own_checks(tmp_path, monkeypatch):
  def refusal(experiment, config, grid, fixed=()):
    planned = sweep.plan(str(tmp_path), experiment, config, grid, fixed)
    with pytest.raises(sweep.SweepError) as error:
      sweep.check(planned)
    assert not tmp_path.joinpath('points').exists()
    return str(error.value)

  quick = 'experiments/configs/synthetic_mlp.py:quickstart'
  # One bad point of six is named; the others would run.
  message = refusal('synthetic_mlp', quick,
                    'learning_rate=1e-3,-1,2e-3;seed=0,1')
  assert message == ('point 3 of 6 (learning_rate=-1,seed=0) (and 1 more) is '
                     'refused by experiments.synthetic_mlp: learning_rate must '
                     'be > 0, got -1.0.')
  assert "flag --config.num_steps=1e-3: invalid literal for int()" in refusal(
      'synthetic_mlp', quick, 'num_steps=10,1e-3')
  assert refusal('synthetic_mlp', quick, 'seed=0,1', ['num_steps=0']) == (
      'every point of experiments.synthetic_mlp is refused: num_steps must be '
      '>= 1, got 0.')
  assert "data.source must be one of" in refusal(
      'igr_mnist_sweep', None, 'data.source=local,web')
  assert "unknown experiment 'synthetic_mpl'" in refusal(
      'synthetic_mpl', None, '')
  assert 'has no config file' in refusal('bench_data', None, '')
  assert 'could not be loaded' in refusal('synthetic_mlp', 'no/such.py', '')
  # A preset and a group that igr_mnist_sweep does not have.
  assert "unknown preset 'quick'" in refusal(
      'igr_mnist_sweep', 'experiments/configs/igr_mnist_sweep.py:quick',
      'optimizer.learning_rate=0.01,0.1;model.width=64,128')
  assert "no key 'optimizer'" in refusal(
      'igr_mnist_sweep', 'experiments/configs/igr_mnist_sweep.py:quickstart',
      'optimizer.learning_rate=0.01,0.1;model.width=64,128')
  # A good sweep passes; a relative --config is found where the points run.
  monkeypatch.chdir(tmp_path)
  sweep.check(sweep.plan(str(tmp_path), 'synthetic_mlp', quick,
                         'learning_rate=0.003,0.01;seed=0,1'))


# -- gather ----------------------------------------------------------------------


def _point(root, name, config, results=None):
  folder = root / 'points' / name
  folder.mkdir(parents=True)
  (folder / 'config.json').write_text(json.dumps(config))
  if results is not None:
    (folder / 'results.json').write_text(json.dumps(results))


def test_gather_one_swept_key_and_unfinished_points(tmp_path):
  for rate, accuracy in ((0.1, 0.5), (0.2, 0.7)):
    _point(tmp_path, f'lr={rate}', {'lr': rate, 'seed': 0},
           {'accuracy': accuracy, 'name': 'mlp'})
  _point(tmp_path, 'lr=0.4', {'lr': 0.4, 'seed': 0})          # not finished
  table = gather.gather(str(tmp_path))
  assert table['swept'] == ['lr'] and table['metrics'] == ['accuracy', 'name']
  assert [row['finished'] for row in table['rows']] == [True, True, False]
  paths = gather.draw(table, str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ['accuracy_vs_lr.png']
  gather.write_tables(table, str(tmp_path))
  with open(tmp_path / 'table.csv') as f:
    rows = list(csv.reader(f))
  assert rows == [['point', 'finished', 'lr', 'accuracy', 'name'],
                  ['lr=0.1', 'True', '0.1', '0.5', 'mlp'],
                  ['lr=0.2', 'True', '0.2', '0.7', 'mlp'],
                  ['lr=0.4', 'False', '0.4', '', '']]
  with pytest.raises(gather.GatherError, match='which no point reports'):
    gather.draw(table, str(tmp_path), ['accuracy', 'bleu'])


def test_gather_draws_the_solver_budget_on_nfe_figures(tmp_path, monkeypatch):
  from jreg import plotting  # pylint: disable=g-import-not-at-top
  figures = {}
  original = plotting.save

  def save(fig, path, dpi=120):
    original(fig, path, dpi)
    figures[os.path.basename(path)] = fig

  monkeypatch.setattr(plotting, 'save', save)
  for weight in (0.0, 1.0):
    _point(tmp_path, f'w={weight}', {
        'jacobian': {'weight': weight}, 'probe': {'max_iter': 100},
        'deq': {'forward': {'max_iter': 6}, 'backward': {'max_iter': 8}}},
        {'train_forward_nfe': 5 - weight, 'train_backward_nfe': 7 - weight,
         'nfe_to_tol': 12 - weight, 'validation_mse': 0.1 + weight})
  table = gather.gather(str(tmp_path))
  gather.draw(table, str(tmp_path))
  drawn = {name: [t.get_text() for t in fig.axes[0].texts]
           for name, fig in figures.items()}
  weight = 'jacobian.weight'
  assert drawn == {f'train_forward_nfe_vs_{weight}.png': ['forward max_iter = 6'],
                   f'train_backward_nfe_vs_{weight}.png': ['backward max_iter = 8'],
                   f'nfe_to_tol_vs_{weight}.png': ['probe max_iter = 100'],
                   f'validation_mse_vs_{weight}.png': []}


def test_gather_refuses_damaged_files(tmp_path):
  with pytest.raises(gather.GatherError, match='holds no point folders'):
    gather.gather(str(tmp_path))
  _point(tmp_path, 'a', {'lr': 1})
  (tmp_path / 'points' / 'a' / 'results.json').write_text('{"accuracy": 0.')
  result = _launch('launch.gather', f'--sweep_dir={tmp_path}', check=False)
  assert result.returncode == 1
  assert result.stderr.strip().startswith('error: ')
  assert 'results.json is not readable JSON' in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


def test_gather_draws_only_what_varies_and_prints_the_table(tmp_path):
  (tmp_path / 'sweep.json').write_text(json.dumps(
      {'grid': 'model.width=4,8;optimizer.learning_rate=0.5,1.0'}))
  for width in (4, 8):
    for rate in (0.5, 1.0):
      _point(tmp_path, f'w={width},lr={rate}',
             {'model': {'width': width}, 'optimizer': {'learning_rate': rate},
              'workdir': f'points/w={width},lr={rate}'},   # varies, not swept
             {'accuracy': width * rate, 'steps': 100, 'noise_variance': 0.01,
              'name': 'mlp', 'solver': f's{width}'})
  table = gather.gather(str(tmp_path))
  assert table['swept'] == ['model.width', 'optimizer.learning_rate']
  assert gather.varying(table) == (
      ['accuracy'], {'steps': 100, 'noise_variance': 0.01, 'name': 'mlp'})
  paths = gather.draw(table, str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ['heatmap_accuracy.png']
  with pytest.raises(gather.GatherError, match='not numbers'):
    gather.draw(table, str(tmp_path), ['solver'])

  result = _launch('launch.gather', f'--sweep_dir={tmp_path}')
  lines = result.stdout.splitlines()
  assert lines[0].split() == ['point', 'finished', 'model.width',
                              'optimizer.learning_rate', 'accuracy']
  assert set(lines[1]) == {'-', ' '}
  assert lines[2].split() == ['w=4,lr=0.5', 'yes', '4', '0.5', '2']
  assert lines[5].split() == ['w=8,lr=1.0', 'yes', '8', '1', '8']
  # Numbers are right-aligned: the column's last characters line up.
  ends = {line.index('0.5') + 3 for line in lines[2:6] if '0.5' in line}
  assert len(ends) == 1
  assert lines[6] == ('the same at every finished point: steps=100, '
                      'noise_variance=0.01, name=mlp')
  assert '4 of 4 points finished' in lines[7]
  assert not list(tmp_path.glob('heatmap_steps*.png'))
