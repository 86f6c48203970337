"""Every ```python block of README.md runs as written in a fresh process."""
import os
import pathlib
import subprocess
import sys

import pytest
from readme_blocks import LIBRARY_SECTION
from readme_blocks import python_blocks

REPO = pathlib.Path(__file__).resolve().parents[1]
BLOCKS = python_blocks()


def test_readme_has_python_blocks():
  assert len(BLOCKS) >= 3
  # tests/test_package.py runs these with the installed wheel.
  assert len(python_blocks(LIBRARY_SECTION)) >= 3


@pytest.mark.parametrize('index', range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
  script = tmp_path / f'readme_block_{index}.py'
  script.write_text(BLOCKS[index])
  env = dict(os.environ, TMPDIR=str(tmp_path),
             PYTHONPATH=os.pathsep.join(
                 p for p in (str(REPO), os.environ.get('PYTHONPATH')) if p))
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, (
      f'README block {index} failed:\n{BLOCKS[index]}\n{result.stderr[-4000:]}')
