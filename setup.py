# cffi cannot yet be configured from pyproject.toml alone; this file only
# hooks the extension builder in.
from setuptools import setup

setup(cffi_modules=["cffi_build/build_uring.py:ffibuilder"])
