"""The servers' side of the launch protocol: the line a server prints once bound.

Starting servers as subprocesses (`start_server`, `ServerProcess`, `start_servers` for a policy
server and a trainer together) lives in the client package, tokenfeedback/launch.py, where the CLI,
the labeling page, the demo, the benchmarks and the tests all import it; the names are re-exported
here for server-side code and tests that import them from common.
"""

from tokenfeedback.launch import LISTENING, LaunchError, ServerProcess, announce, start_server, wait_serving

__all__ = ["LISTENING", "LaunchError", "ServerProcess", "announce", "start_server", "wait_serving"]
