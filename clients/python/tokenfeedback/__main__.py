"""`python -m tokenfeedback` is the `tokenfeedback` command."""

import sys

from tokenfeedback.cli import main

sys.exit(main())
