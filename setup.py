"""jreg: implicit/explicit gradient regularisation and Jacobian-regularised DEQs in JAX/Haiku."""
import setuptools

# A tested, pinned set (Python 3.11, CPU; see BUILD_NOTES.md, "Versions").
INSTALL_REQUIRES = [
    'jax==0.10.2',
    'jaxlib==0.10.2',
    'dm-haiku==0.0.17',
    'optax==0.2.8',
    'chex==0.1.92',
    'absl-py==2.5.1',
    'numpy==2.4.6',
    'tensorflow-datasets==4.9.10',   # used without TensorFlow (tfds.data_source)
    'orbax-checkpoint==0.12.8',      # checkpoints
    'grain==0.2.18',                 # parallel JPEG decoding for ImageNet
    'pillow==13.0.0',                # JPEG decoding
    'matplotlib==3.11.2',            # PNG figures
    'tensorboardX==2.6.5',           # TensorBoard event files without TensorFlow
]

setuptools.setup(
    name='jreg',
    version='0.1.0',
    description=__doc__,
    packages=setuptools.find_packages(include=['jreg', 'jreg.*', 'experiments', 'launch']),
    python_requires='>=3.11,<3.12',
    install_requires=INSTALL_REQUIRES,
    extras_require={'test': ['pytest==9.2.0', 'pytest-xdist==3.8.0']},
)
