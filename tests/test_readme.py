"""Every ```python block of README.md runs as written in a fresh process."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r'^```python\n(.*?)^```', (REPO / 'README.md').read_text(),
                    flags=re.S | re.M)


def test_readme_has_python_blocks():
  assert len(BLOCKS) >= 3


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
