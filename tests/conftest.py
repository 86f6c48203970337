"""Shared test set-up: four faked CPU devices, paths to the offline data."""
import os
import pathlib

# Must be set before JAX initialises its backends: every test process sees four
# CPU devices, so the data-parallel modes are exercised without accelerators.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture(scope='session')
def shared_data():
  """The offline copies of the datasets (`../shared/data`)."""
  if not SHARED_DATA.is_dir():
    pytest.fail(f'{SHARED_DATA} is missing: the tests read the offline datasets '
                'kept beside the repository.')
  return SHARED_DATA
