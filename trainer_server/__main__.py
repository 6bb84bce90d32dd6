"""`python -m trainer_server --model PATH --data DIR --port N --policy HOST:PORT[,...]`: see
trainer_server/server.py (also under `torchrun --nproc-per-node K -m trainer_server ...`)."""

import sys

from trainer_server.server import main

sys.exit(main())
