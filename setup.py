"""jreg: implicit/explicit gradient regularisation and Jacobian-regularised DEQs in JAX/Haiku."""
import pathlib
import re

import setuptools

HERE = pathlib.Path(__file__).resolve().parent
VERSION = re.search(r"^__version__ = '([^']+)'",
                    (HERE / 'jreg' / '__init__.py').read_text(), re.M).group(1)

# Ranges, so that jreg installs beside the JAX and numpy a runtime already has
# (Colab, a cluster's module) instead of replacing them. Each lower bound is a
# version the test suite passed on (constraints/floor.txt: Python 3.12, JAX
# 0.7.2, numpy 2.0.2); the newest tested sets are constraints/py311.txt,
# py312.txt and py313.txt. An upper bound only where a break is known.
INSTALL_REQUIRES = [
    'jax>=0.7.2',
    'jaxlib>=0.7.2',
    'numpy>=2.0.2',
    'dm-haiku>=0.0.14',
    'optax>=0.2.5',
    'chex>=0.1.90',
    'absl-py>=1.4.0',
    'ml_collections>=1.1.0',         # experiment configs
    'tensorflow-datasets>=4.9.9',    # source='tfds': prepared dirs, no TensorFlow
    'importlib_resources>=6.5.2',    # imported by tensorflow-datasets, not declared
    'orbax-checkpoint>=0.11.40',     # checkpoints
    'grain>=0.2.12',                 # parallel JPEG decoding for ImageNet
    'pillow>=11.3.0',                # JPEG decoding
    'matplotlib>=3.10.0',            # PNG figures
    'tensorboardX>=2.6.2.2',         # TensorBoard event files without TensorFlow
    'tqdm>=4.67.1',                  # progress bars (training, downloads)
]

EXTRAS_REQUIRE = {
    # TensorBoard itself, to read the event files jreg writes
    # (`tensorboard --logdir runs/`). Before 2.21 its command imports
    # pkg_resources, which setuptools >= 81 no longer has.
    'tensorboard': [
        'tensorboard>=2.21.0',
    ],
    'test': [
        'pytest>=9.2.0',
        'pytest-xdist>=3.8.0',
        # Executing the notebooks in notebooks/.
        'nbclient>=0.11.0',
        'nbformat>=5.11.1',
        'ipykernel>=7.4.0',
        # Building the wheel and checking it (tests/test_package.py).
        'build>=1.6.1',
        'twine>=7.0.0',
    ],
    # The documentation site (the README's command:
    # sphinx-build -W --keep-going -b html docs docs/_build/html).
    'docs': [
        'sphinx>=9.0.4',
        'myst-parser>=5.2.0',
        'myst-nb>=1.4.0',
        'sphinx-book-theme>=1.4.0',
        'pydata-sphinx-theme>=0.20.0',
        'docutils>=0.22.4',
    ],
}

setuptools.setup(
    name='jreg',
    version=VERSION,
    description=__doc__.split(': ', 1)[1].rstrip('.'),
    long_description=(HERE / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    author='The jreg authors',
    license='Apache-2.0',
    license_files=['LICENSE'],
    # Only the library: `experiments` and `launch` run from a checkout of the
    # repository (`python -m experiments.NAME`), and are not in the wheel.
    packages=setuptools.find_packages(include=['jreg', 'jreg.*']),
    python_requires='>=3.11',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    keywords='jax haiku deep-equilibrium-models implicit-gradient-regularization',
    classifiers=[
        'Development Status :: 3 - Alpha',
        'Intended Audience :: Science/Research',
        'Operating System :: OS Independent',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3 :: Only',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
        'Programming Language :: Python :: 3.13',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
)
