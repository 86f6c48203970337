"""The ```python blocks of README.md, for the tests that run them.

tests/test_readme.py runs every block against the checkout;
tests/test_package.py runs the blocks of the "As a library" section against
the built wheel installed in a fresh virtual environment.
"""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
LIBRARY_SECTION = 'As a library'


def python_blocks(section: str | None = None) -> list[str]:
  """The code of README.md's ```python blocks, in the order they appear.

  Args:
    section: the title of a heading, e.g. 'As a library': only the blocks
      between that heading and the next heading of the same or a higher
      level. None: every block of the file.

  Returns:
    The blocks' code, each ending with a newline.
  """
  blocks, fence, code = [], None, ''
  inside, level = section is None, 0
  for line in README.read_text().splitlines(keepends=True):
    if fence is not None:  # inside a fenced block: '#' starts a comment, not a heading
      if line.startswith('```'):
        if fence == 'python' and inside:
          blocks.append(code)
        fence = None
      else:
        code += line
    elif line.startswith('```'):
      fence, code = line[3:].strip(), ''
    elif section is not None and (heading := re.match(r'(#+) (.*)', line)):
      depth = len(heading[1])
      if heading[2].strip() == section:
        inside, level = True, depth
      elif inside and depth <= level:
        inside = False
  return blocks
