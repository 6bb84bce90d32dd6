"""Build hook: a wheel carries the generated protobuf stubs (tokenfeedback.v1).

The stubs are generated from proto/ at build time, never committed (`make proto` does the same
for a checkout). Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
from gen_proto import generate_stubs  # noqa: E402 - the same generator `make proto` runs


class BuildPyWithStubs(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:  # an editable checkout uses the stubs `make proto` generated
            generate_stubs(self.build_lib)


setup(cmdclass={"build_py": BuildPyWithStubs})
