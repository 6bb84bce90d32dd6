"""`make loadtest`: many concurrent clients generate and submit annotations for a fixed time.

    python -m bench.loadtest                                  # demo model, 32 clients, 3 rounds of 20 s
    python -m bench.loadtest --clients 64 --seconds 30 --rounds 5 --model PATH [--tls]

Starts a policy server and a trainer as subprocesses on 127.0.0.1 (loopback only), with auth on
(tokens generated for the run) and optionally TLS, then runs `--rounds` rounds. In a round every
client loops until the round's time is up: Generate (a seeded, sampled completion of
`--new-tokens` tokens, read to the end), then SubmitAnnotations of that completion with its least
probable token marked bad (prompt ids, sampled ids, behavior logprobs, model version: what a real
annotator sends). Bounded in count (clients x rounds) and time (rounds x seconds).

Reported per round: completed requests and requests/s, latency p50/p99 of Generate (whole
stream), its time to the first token and of SubmitAnnotations, generated tokens/s, errors (must be
0: any failed call is one), and each server's resident memory (VmRSS) before and after. Across
rounds the memory must settle: after the first round (allocator warm-up, caches), a later round may
not grow a server by more than max(5% of its size, 16 MiB), otherwise the run fails as a leak.
Also checked at the end: the trainer stored exactly the annotations acknowledged ACCEPTED. The
result goes to bench/results/loadtest.json; the exit status is 1 when a check failed.

`run_rounds` is what tests/reliability/test_load.py runs in a short form against servers it has.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PROMPTS = ["Ottawa is the capital of", "Paris is the capital of", "The capital of Japan is", "Berlin is",
           "Canberra is the capital of", "The capital of Canada is"]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Round:
    """One round's figures (latencies in milliseconds, memory in bytes)."""

    round: int
    clients: int
    seconds: float
    generates: int = 0
    submits: int = 0
    tokens: int = 0
    accepted: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    generate_ms: dict[str, float] = field(default_factory=dict)
    first_token_ms: dict[str, float] = field(default_factory=dict)
    submit_ms: dict[str, float] = field(default_factory=dict)
    rss_before: dict[str, int] = field(default_factory=dict)
    rss_after: dict[str, int] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return self.generates + self.submits

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    def row(self) -> str:
        mb = 1024 * 1024
        memory = "  ".join(f"{name} {self.rss_before[name] / mb:.0f}->{self.rss_after[name] / mb:.0f}"
                           for name in sorted(self.rss_after))
        return (f"{self.round:>5} {self.clients:>7} {self.requests:>8} {self.requests_per_second:>7.1f} "
                f"{self.generate_ms['p50']:>6.0f}/{self.generate_ms['p99']:<6.0f} "
                f"{self.first_token_ms['p50']:>5.0f}/{self.first_token_ms['p99']:<5.0f} "
                f"{self.submit_ms['p50']:>5.0f}/{self.submit_ms['p99']:<5.0f} "
                f"{self.tokens / self.seconds:>8.0f} {self.errors:>6}  {memory}")


HEADER = (f"{'round':>5} {'clients':>7} {'requests':>8} {'req/s':>7} {'generate ms':>13} {'1st tok ms':>11} "
          f"{'submit ms':>11} {'tokens/s':>8} {'errors':>6}  RSS MiB before->after")


async def _client(index: int, round_index: int, stop_at: float, policy, trainer, token: str | None,
                  new_tokens: int, result: Round, latencies: dict[str, list[float]]) -> None:
    import tokenfeedback.v1.policy_pb2 as ppb
    import tokenfeedback.v1.trainer_pb2 as tpb

    md = (("authorization", f"Bearer {token}"),) if token else None
    i = 0
    while time.monotonic() < stop_at:
        i += 1
        request = ppb.GenerateRequest(prompt_text=PROMPTS[(index + i) % len(PROMPTS)], params=ppb.SamplingParams(
            max_new_tokens=new_tokens, seed=index * 100_003 + i, stop_on_eos=False))
        start = time.perf_counter()
        first = None
        tokens = []
        begin = None
        try:
            async for event in policy.Generate(request, metadata=md, timeout=120):
                kind = event.WhichOneof("event")
                if kind == "start":
                    begin = event.start
                elif kind == "token":
                    first = first or time.perf_counter()
                    tokens.append(event.token)
        except grpc.aio.AioRpcError as exc:
            result.errors += 1
            result.error_samples.append(f"Generate: {exc.code().name}: {exc.details()}")
            continue
        latencies["generate"].append((time.perf_counter() - start) * 1000)
        latencies["first"].append(((first or time.perf_counter()) - start) * 1000)
        result.generates += 1
        result.tokens += len(tokens)
        worst = min(tokens, key=lambda t: t.logprob)
        sequence = tpb.AnnotatedSequence(
            annotation_id=f"load-{round_index}-{index}-{i}-{uuid.uuid4().hex[:8]}",
            prompt_token_ids=begin.prompt_token_ids, completion_token_ids=[t.token_id for t in tokens],
            model_version=begin.model_version, behavior_logprobs=[t.sampling_logprob for t in tokens],
            token_labels=[tpb.TokenLabel(position=worst.position, weight=-1.0)], annotator_id=f"load-{index}")
        start = time.perf_counter()
        try:
            reply = await trainer.SubmitAnnotations(tpb.SubmitAnnotationsRequest(sequences=[sequence]), metadata=md,
                                                    timeout=60)
        except grpc.aio.AioRpcError as exc:
            result.errors += 1
            result.error_samples.append(f"SubmitAnnotations: {exc.code().name}: {exc.details()}")
            continue
        latencies["submit"].append((time.perf_counter() - start) * 1000)
        result.submits += 1
        if reply.results[0].status == tpb.SUBMIT_STATUS_ACCEPTED:
            result.accepted += 1
        else:
            result.errors += 1
            result.error_samples.append(f"SubmitAnnotations: {tpb.SubmitStatus.Name(reply.results[0].status)}")


async def _round(index: int, policy_address: str, trainer_address: str, token: str | None,
                 credentials: grpc.ChannelCredentials | None, clients: int, seconds: float, new_tokens: int,
                 pids: dict[str, int]) -> Round:
    import tokenfeedback.v1.policy_pb2_grpc as ppb_grpc
    import tokenfeedback.v1.trainer_pb2_grpc as tpb_grpc

    def channel(address: str):
        return grpc.aio.secure_channel(address, credentials) if credentials else grpc.aio.insecure_channel(address)

    result = Round(index, clients, seconds)
    result.rss_before = {name: rss_bytes(pid) for name, pid in pids.items()}
    latencies: dict[str, list[float]] = {"generate": [], "first": [], "submit": []}
    # every client its own channels (connections), as separate annotators' programs would have
    channels = [(channel(policy_address), channel(trainer_address)) for _ in range(clients)]
    try:
        start = time.monotonic()
        await asyncio.gather(*(
            _client(i, index, start + seconds, ppb_grpc.PolicyServiceStub(p), tpb_grpc.TrainerServiceStub(t), token,
                    new_tokens, result, latencies)
            for i, (p, t) in enumerate(channels)))
        result.seconds = time.monotonic() - start
    finally:
        for p, t in channels:
            await p.close()
            await t.close()
    result.rss_after = {name: rss_bytes(pid) for name, pid in pids.items()}
    for name, values in (("generate_ms", latencies["generate"]), ("first_token_ms", latencies["first"]),
                         ("submit_ms", latencies["submit"])):
        setattr(result, name, {"p50": quantile(values, 0.5), "p99": quantile(values, 0.99),
                               "mean": statistics.fmean(values) if values else float("nan")})
    result.error_samples = result.error_samples[:5]
    return result


def memory_settles(rounds: list[Round]) -> list[str]:
    """Problems with memory across rounds: growth after the first round beyond the allowance."""
    problems = []
    for later in rounds[1:]:
        for name, after in later.rss_after.items():
            base = rounds[0].rss_after[name]
            allowance = max(0.05 * base, 16 * 1024 * 1024) * (later.round - rounds[0].round)
            if after - base > allowance:
                problems.append(f"{name}: RSS {base / 2**20:.0f} MiB after round {rounds[0].round}, "
                                f"{after / 2**20:.0f} MiB after round {later.round} (allowed +{allowance / 2**20:.0f})")
    return problems


def run_rounds(policy_address: str, trainer_address: str, pids: dict[str, int], *, token: str | None = None,
               credentials: grpc.ChannelCredentials | None = None, clients: int = 32, seconds: float = 20.0,
               rounds: int = 3, new_tokens: int = 16, echo=print) -> dict:
    """Run the rounds against running servers; returns the report (see the module docstring)."""
    echo(HEADER)
    done: list[Round] = []
    for index in range(1, rounds + 1):
        result = asyncio.run(_round(index, policy_address, trainer_address, token, credentials, clients, seconds,
                                    new_tokens, pids))
        done.append(result)
        echo(result.row())
        for sample in result.error_samples:
            echo(f"      error: {sample}")
    problems = memory_settles(done)
    errors = sum(r.errors for r in done)
    if errors:
        problems.insert(0, f"{errors} failed calls")
    return {
        "rounds": [{**asdict(r), "requests": r.requests, "requests_per_second": r.requests_per_second} for r in done],
        "errors": errors,
        "accepted": sum(r.accepted for r in done),
        "problems": problems,
        "ok": not problems,
    }


def trainer_total(address: str, token: str | None, credentials) -> int:
    import tokenfeedback.v1.trainer_pb2 as tpb
    import tokenfeedback.v1.trainer_pb2_grpc as tpb_grpc

    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        md = (("authorization", f"Bearer {token}"),) if token else None
        return tpb_grpc.TrainerServiceStub(channel).GetStatus(tpb.GetStatusRequest(), metadata=md,
                                                              timeout=30).annotations_total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "data" / "demo-model"), help="model both servers load")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of one round (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, memory compared across them (default %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per generation (default %(default)s)")
    parser.add_argument("--tls", action="store_true", help="serve TLS with a throwaway CA (needs openssl)")
    parser.add_argument("--out", type=Path, default=RESULTS / "loadtest.json", help="JSON report")
    args = parser.parse_args(argv)
    if not (1 <= args.clients <= 1024 and 0 < args.seconds <= 600 and 1 <= args.rounds <= 20):
        parser.error("--clients in 1..1024, --seconds in (0, 600], --rounds in 1..20: the run must stay bounded")
    sys.path.insert(0, str(ROOT))
    from common.tls import channel_credentials
    from tokenfeedback.launch import start_servers

    with tempfile.TemporaryDirectory(prefix="tokenfeedback-loadtest-") as tmp:
        folder = Path(tmp)
        token = secrets.token_urlsafe(24)
        (folder / "tokens").write_text(token + "\n")
        (folder / "tokens").chmod(0o600)
        auth = ["--annotator-token-file", str(folder / "tokens")]
        tls, credentials = [], None
        if args.tls:
            from tests.reliability.certs import make_certs

            certs = make_certs(folder / "certs")
            tls = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
            credentials = channel_credentials(certs.ca)
        both = ["--host", "127.0.0.1", *tls, *auth]
        # the load test never calls Train, so the trainer needs no policy server to publish to
        with start_servers(args.model, folder / "trainer", args=both, policy_args=["--max-streams", str(args.clients)],
                           trainer_args=["--sync", "full"], publish=False, cwd=ROOT, timeout=300,
                           credentials=credentials) as servers:
            policy, trainer = servers.processes
            print(f"load test: {args.clients} clients, {args.rounds} rounds of {args.seconds:g}s, "
                  f"{args.new_tokens} tokens per generation, model {args.model}, TLS {'on' if args.tls else 'off'}, "
                  f"auth on, {os.cpu_count()} cores", flush=True)
            report = run_rounds(policy.address, trainer.address, {"policy": policy.proc.pid,
                                                                  "trainer": trainer.proc.pid},
                                token=token, credentials=credentials, clients=args.clients, seconds=args.seconds,
                                rounds=args.rounds, new_tokens=args.new_tokens)
            stored = trainer_total(trainer.address, token, credentials)
            if stored != report["accepted"]:
                report["problems"].append(f"the trainer holds {stored} annotations, {report['accepted']} acknowledged")
                report["ok"] = False
    report["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report["cores"] = os.cpu_count()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    for problem in report["problems"]:
        print(f"FAIL: {problem}")
    total = sum(r["requests"] for r in report["rounds"])
    seconds = sum(r["seconds"] for r in report["rounds"])
    print(f"{'ok' if report['ok'] else 'FAILED'}: {total} requests in {seconds:.0f}s ({total / seconds:.1f}/s), "
          f"{report['errors']} errors, {report['accepted']} annotations stored; report in {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
