"""The main job: the feedback loop on the demo model (`make demo`), and the comparisons built on
it (`make experiment`, `make claims`). Everything here is a client of the two services."""
