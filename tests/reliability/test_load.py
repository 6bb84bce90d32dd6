"""`make loadtest` in a short form: concurrent clients generate and submit against the session's
fuzz servers (auth on) for three 3-second rounds; no call may fail, the trainer must hold exactly
what it acknowledged, and neither server's memory may keep growing from round to round (the full
run, with its figures, is `make loadtest`: bench/loadtest.py)."""

from __future__ import annotations

from bench.loadtest import run_rounds, trainer_total
from tests.reliability.conftest import ANNOTATOR_TOKEN


def test_short_load_run_has_no_errors_and_settles(fuzz_servers):
    policy, trainer = fuzz_servers.policy, fuzz_servers.trainer
    before = trainer_total(trainer.address, ANNOTATOR_TOKEN, None)
    lines: list[str] = []
    report = run_rounds(policy.address, trainer.address, {"policy": policy.proc.pid, "trainer": trainer.proc.pid},
                        token=ANNOTATOR_TOKEN, clients=6, seconds=3.0, rounds=3, new_tokens=8, echo=lines.append)
    table = "\n".join(lines)
    assert report["ok"], f"{report['problems']}\n{table}"
    assert report["errors"] == 0 and all(r["generates"] > 0 and r["submits"] > 0 for r in report["rounds"]), table
    assert trainer_total(trainer.address, ANNOTATOR_TOKEN, None) - before == report["accepted"] > 0
