"""`python -m policy_server --model PATH_OR_HUB_ID --port N`: see policy_server/server.py."""

import sys

from policy_server.server import main

sys.exit(main())
