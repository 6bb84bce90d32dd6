"""Generate the Python stubs (messages, .pyi types, grpc.aio services, Connect services) for
proto/ into OUT/tokenfeedback/v1. Used by `make proto` (scripts/gen_proto.sh, OUT =
clients/python) and by the wheel build (setup.py, OUT = the build folder). Never edit the output.

    python scripts/gen_proto.py OUT
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate_stubs(out: str) -> None:
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


if __name__ == "__main__":
    generate_stubs(sys.argv[1])
