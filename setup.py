"""Generates the gRPC stubs from protos/ whenever the package is built (`pip install .`, wheels), so a
non-editable install carries them; editable installs get them from `make protos`. Everything else is in
pyproject.toml."""
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithStubs(build_py):
    def run(self):
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # the build backend does not put the tree there
        from protos.build import build
        build()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
