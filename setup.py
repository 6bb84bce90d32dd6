"""Build hook: a wheel carries the generated protobuf stubs (tokenfeedback.v1).

The stubs are generated from proto/ at build time, never committed (`make proto` does the same
for a checkout). Everything else about the package is in pyproject.toml.
"""

from __future__ import annotations

import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def generate_stubs(out: str) -> None:
    """Python messages, .pyi types, grpc.aio and Connect services for proto/ into out/tokenfeedback/v1."""
    protos = sorted(
        os.path.join(d, f) for d, _, files in os.walk(os.path.join(ROOT, "proto")) for f in files if f.endswith(".proto")
    )
    plugin = os.path.join(os.path.dirname(sys.executable), "protoc-gen-connectrpc")
    os.makedirs(os.path.join(out, "tokenfeedback", "v1"), exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{os.path.join(ROOT, 'proto')}",
         f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
         f"--plugin=protoc-gen-connectrpc={plugin}", f"--connectrpc_out={out}", "--connectrpc_opt=protobuf=google",
         *protos],
        check=True,
    )  # fmt: skip
    open(os.path.join(out, "tokenfeedback", "v1", "__init__.py"), "a").close()


class BuildPyWithStubs(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:  # an editable checkout uses the stubs `make proto` generated
            generate_stubs(self.build_lib)


setup(cmdclass={"build_py": BuildPyWithStubs})
