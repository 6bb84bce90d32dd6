"""`python -m policy_server --model PATH_OR_HUB_ID --port N`: see policy_server/server.py."""

import logging
import os
import sys

from policy_server.server import main

# The guard matters: the vLLM engine starts worker processes, and a spawned process imports this
# module again (as __mp_main__), which must not start a second server.
if __name__ == "__main__":
    rc = main()
    # Everything is drained and closed by now. Skip the interpreter's teardown of torch/transformers
    # modules, which takes seconds and does nothing useful for a process that is about to end.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
