"""The command line of every experiment: ml_collections configs, workdir, multi-host.

Every experiment is started the same way:

    python -m experiments.NAME --workdir=W \
        [--config=experiments/configs/NAME.py[:PRESET]] [--config.KEY=VALUE ...] \
        [--allow_config_change] [--dist_* ...]

`PRESET` is `paper` (the default), `small` or `quickstart`; `--config.KEY=VALUE`
overrides any key of the config, nested ones too (`--config.deq.forward.tol=1e-4`).
An experiment module defines `run(config, workdir) -> results` and ends with
`cli.main(run, 'NAME')`, which does everything around it (see `main`).

Refusals (one sentence, exit status 1, no traceback): an unknown key, a value of
the wrong type, a value out of range (each config file's `validate`), a workdir
that is a file or cannot be written, a workdir that another process is using, a
resume under a different config (unless `--allow_config_change`), and the
run-time errors of `jreg.errors.UserError`.

Pre-emption: SIGTERM or SIGUSR1 during a command makes its training save a
checkpoint at the next step boundary and stop (`jreg.train.Preempted`); the
command prints that sentence and exits with status 75 (EX_TEMPFAIL,
`jreg.train.PREEMPTED_EXIT_STATUS`), the status on which launch/slurm.sh and
the sweep's sbatch script requeue the job. The same command resumes it.
`checkpoint_minutes` (a key of most configs; 0: off) adds time-based
checkpoints to every training of the command.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import sys
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

from jreg import distributed as _distributed  # defines the --dist_* flags
from jreg import errors
from jreg import train as _train

WORKDIR = flags.DEFINE_string(
    'workdir', None,
    'Directory of the run: config.json, checkpoints, metrics.jsonl, TensorBoard '
    'events, results.json and figures. Re-running a command in the same workdir '
    'resumes it (or re-reports it when it has finished).')
ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False,
    'Resume a run whose saved config.json differs from this config (the '
    'changes are logged); without it such a resume is refused.')

# Where `cli.main` finds an experiment's config file by default.
CONFIGS_PACKAGE = 'experiments.configs'
PRESETS = ('paper', 'small', 'quickstart')
HEADLINE_SIZE = 6  # numbers in the one-line summary of a finished command


class ConfigError(errors.UserError, ValueError):
  """A config key is unknown, of the wrong type, or out of range."""


def config_file(name: str) -> str:
  """The config file of experiment `name` (`experiments/configs/NAME.py`)."""
  package = importlib.import_module(CONFIGS_PACKAGE)
  return os.path.join(os.path.dirname(package.__file__), f'{name}.py')


def config_module(name: str):
  """The module `experiments.configs.NAME` (`get_config`, `validate`)."""
  return importlib.import_module(f'{CONFIGS_PACKAGE}.{name}')


def get_config(name: str, preset: str = 'paper',
               overrides: Mapping[str, Any] | None = None
               ) -> ml_collections.ConfigDict:
  """Experiment `name`'s validated config at `preset`, with dotted `overrides`.

  The library form of `--config=experiments/configs/NAME.py:PRESET
  --config.KEY=VALUE`, for tests, notebooks and the quickstart.

  Raises:
    ConfigError: an unknown preset or key, a wrong type or a value out of range.
  """
  module = config_module(name)
  try:
    config = module.get_config(preset)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  override(config, overrides or {})
  validate(name, config)
  return config


def command_config(name: str, argv: Sequence[str]) -> ml_collections.ConfigDict:
  """The validated config of `python -m experiments.NAME ARGV`, run or not.

  `argv` holds the command's `--config=FILE[:PRESET]` and `--config.KEY=VALUE`
  flags (other flags are refused). They are parsed as the command parses them and
  the config is checked as the command checks it (`validate`), so a launcher
  can refuse a command before it queues it.

  Raises:
    ConfigError: the sentence the command would print: a file that cannot be
      loaded or an unknown preset, an unknown key, a value of the wrong type
      or out of range.
  """
  argv = [f'experiments.{name}', *argv]
  values = flags.FlagValues()
  try:
    config_flag = config_flags.DEFINE_config_file(
        'config', config_file(name), flag_values=values, lock_config=True,
        sys_argv=argv)
    values(argv)
    config = _loaded(config_flag)
  except flags.Error as error:
    raise ConfigError(_flag_error_sentence(error)) from None
  except (KeyError, AttributeError) as error:
    raise ConfigError(_unknown_key_sentence(error, argv)) from None
  except app.UsageError as error:
    raise ConfigError(str(error)) from None
  validate(name, config)
  return config


def override(config: ml_collections.ConfigDict,
             values: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys (`{'deq.forward.tol': 1e-4}`) in place, type-checked.

  Raises:
    ConfigError: an unknown key or a value of the wrong type.
  """
  for key, value in values.items():
    *parents, leaf = key.split('.')
    node = config
    try:
      for part in parents:
        node = node[part]
      if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise KeyError(leaf)
      node[leaf] = tuple(value) if isinstance(value, list) else value
    except KeyError:
      raise ConfigError(f'config key {key!r} does not exist.') from None
    except TypeError as error:
      raise ConfigError(f'config key {key!r}: {_first_line(error)}') from None
  return config


def validate(name: str, config: ml_collections.ConfigDict) -> None:
  """Runs the config file's `validate(config)` and the checks common to all.

  Raises:
    ConfigError: with one sentence naming the key and its allowed range.
  """
  try:
    check_common(config)
    config_module(name).validate(config)
  except ConfigError:
    raise
  except ValueError as error:
    raise ConfigError(str(error)) from None


def check_common(config: ml_collections.ConfigDict) -> None:
  """Range checks of the keys every experiment shares (the naming scheme).

  Raises:
    ValueError: one sentence naming the key.
  """
  def has(key):
    return key in config and config[key] is not None

  if has('seed') and config.seed < 0:
    raise ValueError(f'seed must be >= 0, got {config.seed}.')
  for key in ('num_steps', 'batch_size', 'eval_batch_size', 'log_every'):
    if has(key) and config[key] < 1:
      raise ValueError(f'{key} must be >= 1, got {config[key]}.')
  for key in ('eval_every', 'checkpoint_every'):
    if has(key) and config[key] < 0:
      raise ValueError(f'{key} must be >= 0 (0: at the end), got {config[key]}.')
  if has('checkpoint_minutes') and not config.checkpoint_minutes >= 0:
    raise ValueError('checkpoint_minutes must be >= 0 (0: no time-based '
                     f'checkpoints), got {config.checkpoint_minutes}.')
  if has('learning_rate') and not config.learning_rate > 0:
    raise ValueError(f'learning_rate must be > 0, got {config.learning_rate}.')
  if has('parallel') and config.parallel not in _train.PARALLEL_MODES:
    raise ValueError(f'parallel must be one of {_train.PARALLEL_MODES}, got '
                     f'{config.parallel!r}.')
  if 'data' in config and 'source' in config.data:
    from jreg import tasks  # pylint: disable=g-import-not-at-top
    if config.data.source not in tasks.DATA_SOURCES:
      raise ValueError(f'data.source must be one of {tasks.DATA_SOURCES}, got '
                       f'{config.data.source!r}.')
  if 'optimizer' in config:
    opt = config.optimizer
    for key in ('weight_decay', 'warmup_steps', 'grad_clip'):
      if key in opt and opt[key] < 0:
        raise ValueError(f'optimizer.{key} must be >= 0, got {opt[key]}.')
    if 'momentum' in opt and not 0 <= opt.momentum < 1:
      raise ValueError(f'optimizer.momentum must lie in [0, 1), got '
                       f'{opt.momentum}.')
    if 'schedule' in opt and opt.schedule not in _train.SCHEDULES:
      raise ValueError(f'optimizer.schedule must be one of {_train.SCHEDULES}, '
                       f'got {opt.schedule!r}.')
  if 'jacobian' in config:
    from jreg.tasks import deq as deq_task  # pylint: disable=g-import-not-at-top
    deq_task.check_jacobian(config.jacobian)
  if 'sweep' in config:
    for key, values in config.sweep.items():
      if not isinstance(values, (tuple, list)) or not values:
        raise ValueError(f'sweep.{key} must be a non-empty tuple, got {values!r}.')
      if key in ('seed',) and min(values) < 0:
        raise ValueError(f'sweep.seed values must be >= 0, got {values}.')


def check_devices(config: ml_collections.ConfigDict) -> None:
  """The global batch must split evenly over the devices it is sharded on.

  Raises:
    ConfigError: with the device and process counts.
  """
  if 'batch_size' not in config:
    return
  parallel = config.get('parallel', 'single')
  devices = jax.device_count() if parallel != 'single' else 1
  processes = jax.process_count()
  for divisor, what in ((devices, f'{devices} devices (parallel={parallel})'),
                        (processes, f'{processes} processes')):
    if config.batch_size % divisor:
      raise ConfigError(
          f'batch_size={config.batch_size} is the global batch and must be '
          f'divisible by the {what}.')


def start() -> str:
  """Checks `--workdir` and joins a multi-host run; returns the workdir.

  Raises:
    app.UsageError: no workdir, or a bad `--dist_*` setting.
  """
  if not WORKDIR.value:
    raise app.UsageError('--workdir is required: the directory for checkpoints, '
                         'metrics and figures.')
  try:
    _distributed.initialize_from_flags()
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  return WORKDIR.value


def log_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Shows the resolved config in TensorBoard (a text summary, process 0)."""
  if jax.process_index() != 0:
    return
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  text = '```\n' + json.dumps(config.to_dict(), indent=2, default=str) + '\n```'
  with SummaryWriter(os.path.join(workdir, 'tensorboard')) as writer:
    writer.add_text('config', text, 0)


def config_change_allowed() -> bool:
  """`--allow_config_change` of this command (False outside a command)."""
  return flags.FLAGS.is_parsed() and ALLOW_CONFIG_CHANGE.value


def execute(name: str,
            run_fn: Callable[[ml_collections.ConfigDict, str], Mapping[str, Any]],
            config: ml_collections.ConfigDict, workdir: str,
            allow_config_change: bool = False,
            report: bool = True) -> Mapping[str, Any]:
  """Runs experiment `name` in `workdir` as its command does; returns its results.

  Validates the config, checks the global batch against the devices, locks
  the workdir (a second concurrent run is refused), checks the config against
  `workdir/config.json` (a resume under a different one is refused unless
  `allow_config_change`) and shows it in TensorBoard, then calls
  `run_fn(config, workdir)` with SIGTERM / SIGUSR1 asking its training to
  stop (`jreg.train.stop_on_signals`) and the config's `checkpoint_minutes`
  as the time-based checkpoint interval of its `fit` calls, and, with
  `report`, writes `workdir/report.html` (`jreg.report`: the numbers with
  units, the figures, the config, the command). `config.json` is written once
  the run really starts (its first checkpoint) or when it returns, never by a
  run refused before (its data not found, a checkpoint of another model).

  Raises:
    jreg.errors.UserError: ConfigError, a busy or unusable workdir, a changed
      config, and whatever the run raises.
  """
  from jreg import rundir  # pylint: disable=g-import-not-at-top
  validate(name, config)
  check_devices(config)
  minutes = config.get('checkpoint_minutes') or 0.0
  with _train.stop_on_signals(), rundir.lock(workdir):
    # config.json is written once the run really starts (its first
    # checkpoint) or ends; a run refused before (data not found, a checkpoint
    # of another model) leaves it as it was.
    rundir.check_config(workdir, config.to_dict(),
                        allow_change=allow_config_change, defer=True)
    try:
      log_config(workdir, config)
      with _train.checkpoint_seconds(60.0 * minutes):
        results = run_fn(config, workdir)
      rundir.record_config(workdir)
    finally:
      rundir.forget_config(workdir)
    if report and jax.process_index() == 0:
      from jreg import report as report_lib  # pylint: disable=g-import-not-at-top
      report_lib.write_run_report(workdir, name, config, results)
    return results


def headline(results: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """The numbers of a (nested) results dict, flattened to dotted keys."""
  flat = {}
  for key, value in results.items():
    if isinstance(value, Mapping):
      flat.update(headline(value, f'{prefix}{key}.'))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      flat[f'{prefix}{key}'] = float(f'{value:.6g}') if isinstance(value, float) else value
  return flat


def main(run_fn: Callable[[ml_collections.ConfigDict, str], Mapping[str, Any]],
         name: str,
         finish: Callable[[Mapping[str, Any], str], None] | None = None,
         report: bool = True) -> None:
  """The `__main__` of experiment `name`: the whole command around `run_fn`.

  Defines `--config` (default `experiments/configs/NAME.py`, preset `paper`),
  parses it, validates it, joins a multi-host run, checks the global batch
  against the devices, locks the workdir, checks the config against
  `W/config.json` (refusing a resume under a different one unless
  `--allow_config_change`; the file is written once the run starts) and in
  TensorBoard, calls `run_fn(config, W)`, writes `W/report.html` (unless
  `report` is False) and prints one line with the headline numbers, or calls
  `finish(results, W)` instead when given.
  """
  try:
    # Parses the default file and any --config.KEY=VALUE of sys.argv already.
    config_flag = config_flags.DEFINE_config_file(
        'config', config_file(name),
        f'Config file and preset, FILE[:PRESET] with PRESET in {PRESETS} '
        f'(default: experiments/configs/{name}.py, preset paper); override '
        'any key with --config.KEY=VALUE.', lock_config=True)
  except (KeyError, AttributeError) as error:
    _refuse_unknown_key(error, sys.argv)
  for flag in ('workdir', 'config', 'allow_config_change'):  # shown by --help
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[flag])

  def command(argv):
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments {argv[1:]}: settings are '
                           '--config.KEY=VALUE flags.')
    config = _loaded(config_flag)
    try:
      validate(name, config)
    except ConfigError as error:
      raise app.UsageError(str(error)) from None
    workdir = start()
    results = execute(name, run_fn, config, workdir, ALLOW_CONFIG_CHANGE.value,
                      report=report)
    if finish is not None:
      finish(results, workdir)
      return
    numbers = headline(results)
    shown = dict(list(numbers.items())[:HEADLINE_SIZE])
    more = f' (+{len(numbers) - len(shown)} more)' if len(numbers) > len(shown) else ''
    page = os.path.join(workdir, 'report.html')
    where = f'; report: {page}' if report and os.path.isfile(page) else ''
    print(f'{name} finished in {workdir}: {json.dumps(shown)}{more}{where}',
          flush=True)

  run(command)


def _loaded(config_flag) -> ml_collections.ConfigDict:
  """The parsed config, or a usage error when its file could not be loaded."""
  config = config_flag.value
  try:
    config.keys()
  except IOError as error:
    raise app.UsageError(f'--config could not be loaded: {_first_line(error)}'
                         ) from None
  return config


def _first_line(error: BaseException) -> str:
  """The last meaningful line of an error (ml_collections embeds tracebacks)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config-override errors as one sentence.

  ml_collections raises a bare `KeyError`/`AttributeError` (a traceback) for
  `--config.no_such_key=1`, and embeds a traceback in the message when
  `get_config` rejects a preset; both become `FATAL ...: <sentence>`, exit 1.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    message = _flag_error_sentence(error)
  except (KeyError, AttributeError) as error:
    _refuse_unknown_key(error, argv)
  print(f'FATAL Flags parsing error: {message}', file=sys.stderr, flush=True)
  sys.exit(1)


def _flag_error_sentence(error: flags.Error) -> str:
  """One sentence for a flag that absl or ml_collections could not parse."""
  message = _first_line(error)
  if 'Traceback' in str(error):
    message = f'--config could not be loaded: {message}'
  return message


def _unknown_key_sentence(error: BaseException, argv: Sequence[str]) -> str:
  """One sentence for a `--config.KEY` that the config lacks.

  ml_collections raises `KeyError`/`AttributeError` whose text is the quoted
  key, at times with a suggestion (`Did you mean "learning_rate" ...?`).
  """
  text = str(error).replace('\\', '')
  quoted = re.search(r'[\'"]([A-Za-z_][A-Za-z0-9_]*)[\'"]', text)
  key = quoted.group(1) if quoted else _first_line(error).strip('\'"')
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  hint = (f'did you mean {suggestion.group(1)!r}?' if suggestion else
          'the keys are those of its get_config')
  given = [arg.split('=', 1)[0] for arg in argv[1:] if arg.startswith('--config.')]
  named = [arg for arg in given if key in arg.split('.')[1:]] or given
  return f'{", ".join(named)}: the config has no key {key!r} ({hint}).'


def _refuse_unknown_key(error: BaseException, argv: list[str]) -> None:
  """Exits with one sentence for a `--config.KEY` that the config lacks."""
  print(f'FATAL Flags parsing error: {_unknown_key_sentence(error, argv)}',
        file=sys.stderr, flush=True)
  sys.exit(1)


def _sentences(main_fn):
  """`main_fn` with usage and config errors printed as one sentence, exit 1
  (absl would print the module's whole docstring before a UsageError)."""
  def wrapped(argv):
    try:
      return main_fn(argv)
    except (app.UsageError, ConfigError) as error:
      print(f'FATAL: {error}', file=sys.stderr, flush=True)
      sys.exit(1)
  return wrapped


def run(main_fn) -> None:
  """`app.run(main_fn)`, with the run-time errors a user can act on reported as
  one sentence and exit status 1 instead of a traceback: every
  `jreg.errors.UserError` (bad data, a NaN or infinite loss, a busy workdir,
  a changed configuration, an unusable checkpoint or workdir, a batch that
  does not split over the devices). A run stopped by a signal
  (`jreg.train.Preempted`) prints its sentence and exits with status 75."""
  from jreg.errors import UserError  # pylint: disable=g-import-not-at-top

  def guarded(argv):
    try:
      return _sentences(main_fn)(argv)
    except _train.Preempted as stopped:
      print(str(stopped), file=sys.stderr, flush=True)
      sys.exit(stopped.exit_status)
    except UserError as error:
      print(f'FATAL: {error}', file=sys.stderr, flush=True)
      sys.exit(1)

  app.run(guarded, flags_parser=parse_flags)
