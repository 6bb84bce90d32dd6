"""`python -m demo` is `make demo`: see demo/loop.py."""

import sys

from demo.loop import main

sys.exit(main())
