"""jreg: implicit/explicit gradient regularisation and Jacobian-regularised DEQs in JAX/Haiku."""
import setuptools

# The newest set tested on each Python (CPU): JAX 0.10.2 is the last release
# for Python 3.11; Python 3.12 and 3.13 get JAX 0.12.0.1. The complete tested
# environments, dependencies of dependencies included, are pinned in
# constraints/py3XX.txt (`pip install -e '.[test]' -c constraints/py313.txt`).
_PY311 = '; python_version < "3.12"'
_PY312_PLUS = '; python_version >= "3.12"'
INSTALL_REQUIRES = [
    'jax==0.10.2' + _PY311,
    'jaxlib==0.10.2' + _PY311,
    'numpy==2.4.6' + _PY311,
    'jax==0.12.0.1' + _PY312_PLUS,
    'jaxlib==0.12.0.1' + _PY312_PLUS,
    'numpy==2.5.5' + _PY312_PLUS,
    'dm-haiku==0.0.17',
    'optax==0.2.8',
    'chex==0.1.92',
    'absl-py==2.5.1',
    'ml_collections==1.1.0',         # experiment configs
    'tensorflow-datasets==4.9.10',   # source='tfds': prepared dirs, no TensorFlow
    'importlib_resources==7.1.0',    # imported by tensorflow-datasets, not declared
    'orbax-checkpoint==0.12.8',      # checkpoints
    'grain==0.2.18',                 # parallel JPEG decoding for ImageNet
    'pillow==13.0.0',                # JPEG decoding
    'matplotlib==3.11.2',            # PNG figures
    'tensorboardX==2.6.5',           # TensorBoard event files without TensorFlow
    'tqdm==4.70.1',                  # progress bars (training, downloads)
]

setuptools.setup(
    name='jreg',
    version='0.1.0',
    description=__doc__,
    # Only the library: `experiments` and `launch` run from the repository
    # root (`python -m experiments.NAME`), and are not installed.
    packages=setuptools.find_packages(include=['jreg', 'jreg.*']),
    python_requires='>=3.11,<3.14',
    install_requires=INSTALL_REQUIRES,
    extras_require={'test': [
        'pytest==9.2.0', 'pytest-xdist==3.8.0',
        # Executing the notebooks in notebooks/.
        'nbclient==0.11.0', 'nbformat==5.11.1', 'ipykernel==7.4.0',
    ], 'docs': [
        # The documentation site: sphinx-build -W --keep-going docs docs/_build/html
        'sphinx==9.0.4', 'myst-parser==5.2.0', 'myst-nb==1.4.0',
        'sphinx-book-theme==1.4.0', 'pydata-sphinx-theme==0.20.0',
        'docutils==0.22.4',
    ]},
)
