"""The `undying` command: a thin layer over the Python API.

Errors are one readable line on stderr and a non-zero exit code; set
UNDYING_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_AGENT = "undying.actors.research:agent"
LEAD_AGENT = "undying.actors.research:lead"

DEMO_QUESTIONS = [
    "How do fencing tokens stop zombie writers, and what is a lease?",
    "What does appendfsync always guarantee, and what can everysec lose?",
    "What is full jitter in exponential back-off, and how does Retry-After help?",
    "What is a transactional outbox, and how do idempotency keys prevent duplicates?",
    "How does a token bucket limit requests, and what is an OTP supervision tree?",
    "What do Ray actors offer LLM agents, and what is the actor model?",
]


def _client() -> Any:
    from undying import connect

    return connect()


def _fmt_ms(ms: float) -> str:
    return f"{ms:7.1f} ms"


def _model_config(args: argparse.Namespace, *, show: bool = True) -> Any:
    """The model configuration (`undying._model_config`); None: the agents' own models.

    Loaded before anything connects, so a mistake in it costs no cluster start-up. A key
    variable that is not set is an error when the executors are this machine's (a local
    Ray inherits this environment), a warning when they are a cluster's own nodes."""
    from undying._model_config import load_model_config
    from undying.cluster import Settings

    config = load_model_config(args.model_config)
    if config is None:
        return None
    if show:
        _show_model(config)
    missing = config.missing_keys()
    if missing:
        names = ", ".join(f"${n}" for n in missing)
        if not Settings.from_env().ray_address:
            from undying.actors._models import ModelConfigError

            raise ModelConfigError(f"{names} (named by the model configuration for the API key) "
                                   "is not set in this environment; set it and run again")
        print(f"undying: warning: {names} is not set here; every node that runs model calls "
              "needs it", file=sys.stderr)
    return config


def _show_model(config: Any) -> None:
    """Provider, model, base URL and the key's variable name: never the key."""
    for line in config.describe():
        print(f"  {line}")


def cmd_demo(args: argparse.Namespace) -> int:
    """A small batch: research leads over the bundled corpus, each with research sub-agents."""
    from pathlib import Path

    from undying._batch import run_batch
    from undying.actors.research import lead, slow_lead
    from undying.cluster import Settings

    config = _model_config(args, show=False)
    agent = config.apply(lead) if config is not None else slow_lead(args.latency)
    model = ("the model configured below" if config is not None
             else f"offline scripted model, {args.latency:g}s per model call")
    settings = Settings.from_env()
    folder = Path(settings.home) / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    questions, out = folder / f"questions-{stamp}.jsonl", folder / f"results-{stamp}.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i + 1}", "question": q}) + "\n"
                                 for i, q in enumerate(DEMO_QUESTIONS[: args.questions])))
    ud = _client()
    print(f"undying demo: a batch of {args.questions} research questions over the bundled corpus;"
          f" each lead delegates its sub-questions to research sub-agents ({model}). "
          f"Redis {ud.redis_url.split('@')[-1]}")
    if config is not None:
        _show_model(config)
    print(f"  questions: {questions}")
    t0 = time.monotonic()
    # on Ctrl-C, run_batch prints the `undying batch` command that continues the demo's batch
    # with the same agent: the questions not started yet run as the demo would have run them
    argv = ["batch", str(questions), "--out", str(out), "--concurrency", str(args.concurrency),
            "--agent", LEAD_AGENT]
    if config is None:
        argv += ["--latency", f"{args.latency:g}"]
    elif args.model_config:
        argv += ["--model-config", args.model_config]  # (or the same UNDYING_* variables)
    try:
        report = run_batch(ud, agent, questions, out, concurrency=args.concurrency, argv=argv)
    except KeyboardInterrupt:
        return 130
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    print()
    for r in sorted(rows, key=lambda r: r["line"]):
        print(f"== {r['id']} {r['run_id']} ({r['status']}, {r['steps']} steps, "
              f"{r['subagents']} sub-agents, {r['duration_s']:.1f}s)")
        print(r["answer"] or r["error"])
        print()
    print(f"done in {time.monotonic() - t0:.1f}s: {report.finished} finished, {report.failed} "
          f"failed; at most {report.subagents_peak} sub-agents in flight. Results: {out}")
    if rows:
        print(f"Try: undying status {rows[0]['run_id']} --tree   or   undying history "
              f"{rows[0]['run_id']}")
    return 0 if report.failed == 0 else 2


def cmd_run(args: argparse.Namespace) -> int:
    from undying.actors import load_agent

    agent = load_agent(args.agent)
    config = _model_config(args)
    if config is not None:
        agent = config.apply(agent)
    ud = _client()
    h = ud.start(agent, args.task, run_id=args.run_id)
    print(f"run {h.run_id} started")
    if args.no_wait:
        return 0
    return _follow(ud, h.run_id, args.timeout)


def _follow(ud: Any, run_id: str, timeout: float) -> int:
    for _, ev in ud.watch(run_id, timeout=timeout):
        print(f"  step {ev.step:3d} {ev.kind:<12} {ev.summary[:70]}")
    res = ud.wait(run_id)
    print(res.answer if res.status == "finished" else f"{res.status}: {res.error}")
    return 0 if res.status == "finished" else 2


def cmd_batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from undying._batch import run_batch
    from undying.actors import load_agent
    from undying.actors.research import slow_agent, slow_lead

    questions, out = Path(args.questions), Path(args.out)
    if not questions.exists():
        print(f"undying: error: no file {questions}", file=sys.stderr)
        return 1
    config = _model_config(args)
    if config is not None:
        if args.latency > 0:
            print("undying: warning: --latency is ignored: the model comes from the "
                  "configuration", file=sys.stderr)
        agent = config.apply(load_agent(args.agent))
    elif args.latency > 0 and args.agent == LEAD_AGENT:
        agent = slow_lead(args.latency)
    elif args.latency > 0 and args.agent == DEFAULT_AGENT:
        agent = slow_agent(args.latency)
    else:
        agent = load_agent(args.agent)
    ud = _client()
    try:
        report = run_batch(ud, agent, questions, out, concurrency=args.concurrency)
    except KeyboardInterrupt:
        return 130  # run_batch printed the command that continues the batch
    print(f"{report.finished} finished, {report.failed} failed, {report.already_done} already "
          f"done, {len(report.bad_lines)} bad lines skipped, at most {report.subagents_peak} "
          f"sub-agents in flight; results in {out}")
    return 0 if report.failed == 0 else 2


def cmd_status(args: argparse.Namespace) -> int:
    ud = _client()
    if args.run and args.tree:
        rows = [{"depth": depth, "run_id": i.run_id, "status": i.status, "step": i.step,
                 "epoch": i.epoch, "agent": i.agent, "reason": i.reason}
                for depth, i in ud.tree(args.run)]
        if args.json:
            print(json.dumps(rows))
            return 0
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        for r in rows:
            name = r["run_id"] if r["depth"] == 0 else r["run_id"].rsplit(".", 1)[-1]
            print(f"{'  ' * r['depth']}{name:<{max(8, 40 - 2 * r['depth'])}} {r['status']:<11} "
                  f"step {r['step']:4d}  {str(r['reason'])[:50]}")
        print(f"{len(rows)} runs: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        return 0
    if args.run:
        info = ud.info(args.run)
        row = {"run_id": info.run_id, "status": info.status, "step": info.step,
               "epoch": info.epoch, "agent": info.agent, "reason": info.reason}
        if args.json:
            print(json.dumps(row))
        else:
            for k, v in row.items():
                print(f"{k:>8}: {v}")
        return 0
    runs = ud.runs(args.state)
    if args.json:
        print(json.dumps([r.__dict__ for r in runs]))
        return 0
    if not runs:
        print("no runs")
    for r in runs:
        print(f"{r.run_id}  {r.status:<11} step {r.step:4d}  epoch {r.epoch}  {r.reason[:60]}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from undying._cli_observe import cmd_history as history

    return history(args)


def cmd_resume(args: argparse.Namespace) -> int:
    ud = _client()
    h = ud.resume(args.run)
    print(f"run {h.run_id} resumed from step {h.status().step}")
    if args.no_wait:
        return 0
    return _follow(ud, h.run_id, args.timeout)


def cmd_cancel(args: argparse.Namespace) -> int:
    ud = _client()
    ud.cancel(args.run, args.reason)
    print(f"cancel sent to {args.run}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="undying", description="Durable execution for AI agents.")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="a small batch of research questions, with sub-agents")
    d.add_argument("--questions", type=int, default=len(DEMO_QUESTIONS))
    d.add_argument("--latency", type=float, default=1.0,
                   help="simulated latency of the scripted model, seconds (without --model-config)")
    d.add_argument("--concurrency", type=int, default=3, help="questions in flight at once")
    _model_config_arg(d)
    d.set_defaults(fn=cmd_demo)

    r = sub.add_parser("run", help="start a run of an agent on a task")
    r.add_argument("task")
    r.add_argument("--agent", default=DEFAULT_AGENT,
                   help="importable agent, module:attribute")
    r.add_argument("--run-id")
    r.add_argument("--no-wait", action="store_true")
    r.add_argument("--timeout", type=float, default=600.0)
    _model_config_arg(r)
    r.set_defaults(fn=cmd_run)

    b = sub.add_parser("batch", help="one run per line of a JSONL file; resumable")
    b.add_argument("questions", help='JSONL, one {"question": ..., "id": ...} per line')
    b.add_argument("--out", required=True, help="results JSONL (appended as runs finish)")
    b.add_argument("--concurrency", type=int, default=8, help="root runs in flight at once")
    b.add_argument("--agent", default=LEAD_AGENT,
                   help="importable agent, module:attribute (default: the research lead, which "
                        "delegates to research sub-agents)")
    b.add_argument("--latency", type=float, default=0.0,
                   help="simulated model latency of the built-in research agents, seconds")
    _model_config_arg(b)
    b.set_defaults(fn=cmd_batch)

    s = sub.add_parser("status", help="one run, or every run")
    s.add_argument("run", nargs="?")
    s.add_argument("--state", help="only runs in this state")
    s.add_argument("--tree", action="store_true", help="the run and every sub-agent below it")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)

    h = sub.add_parser("history", help="every step of a run")
    h.add_argument("run")
    h.add_argument("--json", action="store_true")
    h.set_defaults(fn=cmd_history)

    rs = sub.add_parser("resume", help="resume a run from its latest checkpoint")
    rs.add_argument("run")
    rs.add_argument("--no-wait", action="store_true")
    rs.add_argument("--timeout", type=float, default=600.0)
    rs.set_defaults(fn=cmd_resume)

    c = sub.add_parser("cancel", help="cancel a run")
    c.add_argument("run")
    c.add_argument("--reason", default="cancelled by user")
    c.set_defaults(fn=cmd_cancel)

    from undying import _cli_approvals

    _cli_approvals.add_parsers(sub)

    from undying import _cli_observe

    _cli_observe.add_parsers(sub)  # watch, fork, gc, exporter
    return p


def _model_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-config", metavar="FILE",
                   help="TOML file: provider, base_url, model, api_key_env (the variable that "
                        "holds the key), options (default: $UNDYING_MODEL_CONFIG; UNDYING_PROVIDER, "
                        "UNDYING_BASE_URL, UNDYING_MODEL, UNDYING_API_KEY_ENV, "
                        "UNDYING_SUBAGENT_MODEL override it). Replaces the agent's model and its "
                        "sub-agents'")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        print("undying: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("UNDYING_DEBUG"):
            raise
        from undying.persistence import UndyingError

        kind = "error" if isinstance(exc, UndyingError) else type(exc).__name__
        print(f"undying: {kind}: {exc}", file=sys.stderr)
        return 1
    finally:
        _shutdown()


def _shutdown() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
