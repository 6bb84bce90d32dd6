"""`python -m tokenfeedback.labelstudio ARGS` is `tokenfeedback labelstudio-backend ARGS`."""

import sys

from tokenfeedback.cli import main

sys.exit(main(["labelstudio-backend", *sys.argv[1:]]))
