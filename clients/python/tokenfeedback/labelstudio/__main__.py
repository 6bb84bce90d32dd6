"""`python -m tokenfeedback.labelstudio --policy HOST:PORT --trainer HOST:PORT --port N`: the backend
(the same as `tokenfeedback labelstudio-backend`)."""

from tokenfeedback.labelstudio.backend import main

main()
