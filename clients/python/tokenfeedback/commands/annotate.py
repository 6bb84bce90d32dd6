"""`tokenfeedback annotate`: submit annotations from a JSONL, Label Studio or doccano file."""

from __future__ import annotations

import argparse
import sys

import tokenfeedback.v1.trainer_pb2 as trainer_pb2
from tokenfeedback.commands.registry import CliError, Context, command, to_dict_compact
from tokenfeedback.errors import TokenfeedbackError
from tokenfeedback.imports import FORMATS, load, loads


def _configure_annotate(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="annotation file ('-' reads stdin)")
    p.add_argument("--format", "-f", choices=("auto", *FORMATS), default="auto",
                   help="jsonl: AnnotatedSequence per line (proto JSON); labelstudio: a Label Studio JSON "
                        "export; doccano: doccano JSONL; auto (default): tell from the content")
    p.add_argument("--partial-ok", action="store_true",
                   help="store the valid sequences and report the invalid ones (default: all or nothing per batch)")
    p.add_argument("--batch-size", type=int, default=256, help="sequences per request (default 256)")
    p.add_argument("--annotator", default=None, help="set annotator_id on sequences that have none")
    p.add_argument("--dry-run", action="store_true", help="convert and print the sequences (JSONL); submit nothing")


@command("annotate", "submit annotations from a JSONL, Label Studio or doccano file", _configure_annotate)
def run_annotate(args: argparse.Namespace, ctx: Context) -> int:
    if args.batch_size < 1:
        raise CliError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.file == "-":
        imported = loads(sys.stdin.read(), args.format, source="<stdin>")
    else:
        imported = load(args.file, args.format)
    for sequence in imported.sequences:
        if args.annotator and not sequence.annotator_id:
            sequence.annotator_id = args.annotator
    for reason in imported.skipped:
        ctx.emit({"event": "skipped", "reason": reason}) if ctx.json else ctx.note(f"skipped {reason}")
    if args.dry_run:
        for sequence in imported.sequences:
            ctx.emit(to_dict_compact(sequence))
        return 0
    counts = {"ACCEPTED": 0, "DUPLICATE": 0, "REJECTED": 0}
    with ctx.trainer() as trainer:
        for first in range(0, len(imported.sequences), args.batch_size):
            batch = imported.sequences[first:first + args.batch_size]
            try:
                results = trainer.submit(batch, partial_ok=args.partial_ok)
            except TokenfeedbackError as exc:
                if first:
                    ctx.note(f"sequences before #{first} were stored; this batch ({len(batch)}) and later ones were not")
                raise exc
            for result in results:
                status = trainer_pb2.SubmitStatus.Name(result.status).removeprefix("SUBMIT_STATUS_")
                counts[status] = counts.get(status, 0) + 1
                if ctx.json:
                    ctx.emit({"event": "result", "annotation_id": result.annotation_id, "status": status,
                              "rows": result.rows, "reason": result.reason})
                else:
                    ctx.say(f"{status.lower():9} {result.annotation_id}  rows={result.rows}"
                            + (f"  {result.reason}" if result.reason else ""))
    summary = {k.lower(): v for k, v in counts.items()} | {"skipped": len(imported.skipped)}
    if ctx.json:
        ctx.emit({"event": "summary", **summary})
    else:
        ctx.note(", ".join(f"{v} {k}" for k, v in summary.items()))
    return 1 if counts["REJECTED"] else 0
