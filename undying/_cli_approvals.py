"""`undying approvals`, `undying approve`, `undying reject`: people decide on tool calls."""

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


def add_parsers(sub: Any) -> None:
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
