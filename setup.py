"""The compiled part of the package (everything else is configured in pyproject.toml)."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("distillguard.signals._skeleton", ["src/distillguard/signals/_skeleton.pyx"],
                   extra_compile_args=["-O2"])],
        compiler_directives={"language_level": 3},
    ),
)
