"""`undying approvals` / `approve` / `reject` and `undying in-doubt` / `resolve`: people
decide on tool calls (before they run, or after their executor died mid-call)."""

from __future__ import annotations

import argparse
import getpass
import json
import time
from typing import Any


def _client() -> Any:
    from undying import connect

    return connect()


def cmd_approvals(args: argparse.Namespace) -> int:
    rows = _client().approvals(args.run)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows]))
        return 0
    if not rows:
        print("no tool call is waiting for approval")
    now = time.time() * 1000
    for r in rows:
        print(f"{r.run_id}  {r.call_id}  {r.tool}  {json.dumps(r.arguments, sort_keys=True)}  "
              f"{r.args_hash}  waiting {(now - r.since_ms) / 1000:.0f}s")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    _client().approve(args.run, args.call, by=args.by, args_hash=args.hash)
    print(f"approved {args.call} of {args.run} (by {args.by})")
    return 0


def cmd_reject(args: argparse.Namespace) -> int:
    _client().reject(args.run, args.call, by=args.by, reason=args.reason, args_hash=args.hash)
    print(f"rejected {args.call} of {args.run} (by {args.by})")
    return 0


def cmd_in_doubt(args: argparse.Namespace) -> int:
    rows = _client().in_doubt(args.run)
    if not rows:
        print("no tool call is in doubt")
    for run_id, call_id, tool, arguments in rows:
        print(f"{run_id}  {call_id}  {tool}  {json.dumps(arguments, sort_keys=True)}")
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    outcome = "done" if args.done is not None else "failed" if args.failed is not None else "retry"
    _client().resolve(args.run, args.call, outcome, by=args.by, output=args.done or "",
                      reason=args.failed or "")
    print(f"{args.call} of {args.run} settled: {outcome} (by {args.by})")
    return 0


def add_parsers(sub: Any) -> None:
    d = sub.add_parser("in-doubt", help="at-most-once calls that may or may not have happened")
    d.add_argument("run", nargs="?")
    d.set_defaults(fn=cmd_in_doubt)
    r = sub.add_parser("resolve", help="settle a call in doubt: it happened, failed, or retry it")
    r.add_argument("run")
    r.add_argument("call")
    how = r.add_mutually_exclusive_group(required=True)
    how.add_argument("--done", metavar="OUTPUT", help="it happened; what the model sees")
    how.add_argument("--failed", metavar="REASON", help="it did not happen; do not retry")
    how.add_argument("--retry", action="store_true", help="it did not happen; run it again")
    r.add_argument("--by", default=getpass.getuser())
    r.set_defaults(fn=cmd_resolve)
    a = sub.add_parser("approvals", help="tool calls waiting for someone's decision")
    a.add_argument("run", nargs="?")
    a.add_argument("--json", action="store_true")
    a.set_defaults(fn=cmd_approvals)
    for name, fn, verb in (("approve", cmd_approve, "approve"), ("reject", cmd_reject, "reject")):
        p = sub.add_parser(name, help=f"{verb} a tool call that waits for approval")
        p.add_argument("run")
        p.add_argument("call", help="the call id (see `undying approvals`)")
        p.add_argument("--by", default=getpass.getuser(), help="who decides (default: you)")
        p.add_argument("--hash", help="the arguments' hash you reviewed; refused if different")
        if name == "reject":
            p.add_argument("--reason", default="")
        p.set_defaults(fn=fn)
