"""The systems of `python -m bench.peers` that run in a process of their own.

Each runs the workload of `_peers_workload` through its own durable mechanism:

  undying-inline  undying's engine with no Ray (`undying.testing.run_inline` /
                  `resume_inline`) on a `RedisStore`: an `Agent` with the scripted
                  policy ``bench-peers`` and the ``lookup`` @tool
  langgraph-pg    LangGraph: a `StateGraph(MessagesState)` with an ``agent`` node and a
                  ``tools`` node, compiled with `PostgresSaver` (langgraph-checkpoint-
                  postgres, `from_conn_string`: autocommit, dict rows, as its docs say)
  dbos            DBOS Transact: a ``@DBOS.workflow()`` that calls a ``@DBOS.step()``
                  for the model turn and one for the tool, on PostgreSQL
  raw-redis       the floor for durability: one RPUSH of each message (msgpack), the
                  user task, every model turn and every tool result, on the same Redis

`run` drives one run to its end in a process that is already set up (connections open,
graph compiled, DBOS launched). `resume` continues a run that a crash trial left behind
and builds everything it needs from nothing but the imports, because that is what a
new process has to do after the old one was killed; its clock starts before that.
"""

from __future__ import annotations

import time
from typing import Any

from . import _peers_workload as W


class System:
    name = ""

    def run(self, n: int, key: str, variant: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def resume(self, key: str, variant: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.monotonic()
    out = fn()
    return out, t0


# -- undying, no Ray ------------------------------------------------------------------------


class UndyingInline(System):
    name = "undying-inline"

    def __init__(self) -> None:
        self.stores: dict[str, Any] = {}

    def _store(self, url: str) -> Any:
        from undying.persistence import RedisStore

        if url not in self.stores:
            self.stores[url] = RedisStore(url)
        return self.stores[url]

    def run(self, n: int, key: str, variant: dict[str, Any]) -> dict[str, Any]:
        from undying.testing import run_inline

        t0 = time.monotonic()
        state = run_inline(self._store(variant["redis_url"]), W.agent, W.task_text(n, key),
                           run_id=key)
        return {"t0": t0, "t_end": time.monotonic(), "result": state.result,
                "status": state.status}

    def resume(self, key: str, variant: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        from undying.persistence import RedisStore
        from undying.testing import resume_inline

        store = RedisStore(variant["redis_url"])
        state = resume_inline(store, key)
        t_end = time.monotonic()
        store.close()
        return {"t0": t0, "t_end": t_end, "result": state.result, "status": state.status}

    def close(self) -> None:
        for s in self.stores.values():
            s.close()


# -- LangGraph + PostgresSaver ----------------------------------------------------------------


def _graph() -> Any:
    from ._peers_lg_graph import graph

    return graph()


def _lg_config(key: str, n: int) -> dict[str, Any]:
    return {"configurable": {"thread_id": key}, "recursion_limit": 3 * n + 10}


class LangGraphPG(System):
    name = "langgraph-pg"

    def __init__(self) -> None:
        self.cm: Any = None
        self.saver: Any = None
        self.graph: Any = None

    def _ready(self, url: str) -> Any:
        if self.graph is None:
            from langgraph.checkpoint.postgres import PostgresSaver

            self.cm = PostgresSaver.from_conn_string(url)
            self.saver = self.cm.__enter__()
            self.saver.setup()
            self.graph = _graph().compile(checkpointer=self.saver)
        return self.graph

    def run(self, n: int, key: str, variant: dict[str, Any]) -> dict[str, Any]:
        from langchain_core.messages import HumanMessage

        graph = self._ready(variant["pg_url"])
        t0 = time.monotonic()
        out = graph.invoke({"messages": [HumanMessage(W.task_text(n, key))]}, _lg_config(key, n),
                           durability=variant["durability"])
        return {"t0": t0, "t_end": time.monotonic(), "result": str(out["messages"][-1].content),
                "status": "finished"}

    def resume(self, key: str, variant: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        from langgraph.checkpoint.postgres import PostgresSaver

        with PostgresSaver.from_conn_string(variant["pg_url"]) as saver:
            graph = _graph().compile(checkpointer=saver)
            n = variant["n"]
            out = graph.invoke(None, _lg_config(key, n), durability=variant["durability"])
            t_end = time.monotonic()
        return {"t0": t0, "t_end": t_end, "result": str(out["messages"][-1].content),
                "status": "finished"}

    def try_redis(self, redis_url: str) -> dict[str, Any]:
        """LangGraph's Redis checkpointer on our plain redis-server: setup() and one run."""
        try:
            from langgraph.checkpoint.redis import RedisSaver

            with RedisSaver.from_conn_string(redis_url) as saver:
                saver.setup()
                graph = _graph().compile(checkpointer=saver)
                from langchain_core.messages import HumanMessage

                graph.invoke({"messages": [HumanMessage(W.task_text(2, "lgr-probe"))]},
                             _lg_config("lgr-probe", 2), durability="sync")
            return {"ok": True}
        except Exception as exc:  # the point is to report it
            return {"ok": False, "reason": f"{type(exc).__module__}.{type(exc).__name__}: {exc}"}

    def close(self) -> None:
        if self.cm is not None:
            self.cm.__exit__(None, None, None)


# -- DBOS Transact ------------------------------------------------------------------------------

_DBOS_FUNCS: dict[str, Any] = {}


def _dbos_register() -> dict[str, Any]:
    """The workflow and its two steps (registered once per process, before launch)."""
    if _DBOS_FUNCS:
        return _DBOS_FUNCS
    from dbos import DBOS

    @DBOS.step()
    def bench_model(k: int, n: int, tag: str) -> tuple[str, dict[str, Any] | None]:
        return W.model_turn(k, n, tag)

    @DBOS.step()
    def bench_lookup(k: int, key: str) -> str:
        W.maybe_crash(k, key)
        return W.tool_result(k)

    @DBOS.workflow()
    def bench_agent(task: str) -> str:
        n, tag = W.parse_task(task)
        key = DBOS.workflow_id or tag
        messages: list[dict[str, Any]] = [{"role": "user", "content": task}]
        k = 0
        while True:
            content, call = bench_model(k, n, tag)
            messages.append({"role": "assistant", "content": content, "tool_call": call})
            if call is None:
                return content
            messages.append({"role": "tool", "content": bench_lookup(k, key),
                             "tool_call_id": call["id"]})
            k += 1

    _DBOS_FUNCS.update(agent=bench_agent)
    return _DBOS_FUNCS


def _dbos_launch(url: str) -> Any:
    from dbos import DBOS

    funcs = _dbos_register()
    DBOS(config={"name": "undying-bench-peers", "system_database_url": url,
                 "log_level": "WARNING"})
    DBOS.launch()
    return funcs


class DBOSPG(System):
    name = "dbos"

    def __init__(self) -> None:
        self.launched = False

    def run(self, n: int, key: str, variant: dict[str, Any]) -> dict[str, Any]:
        from dbos import SetWorkflowID

        if not self.launched:
            _dbos_launch(variant["pg_url"])
            self.launched = True
        agent = _DBOS_FUNCS["agent"]
        t0 = time.monotonic()
        with SetWorkflowID(key):
            out = agent(W.task_text(n, key))
        return {"t0": t0, "t_end": time.monotonic(), "result": out, "status": "finished"}

    def resume(self, key: str, variant: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        from dbos import DBOS

        _dbos_launch(variant["pg_url"])  # launch recovers this executor's pending workflows
        self.launched = True
        out = DBOS.retrieve_workflow(key).get_result()
        return {"t0": t0, "t_end": time.monotonic(), "result": out, "status": "finished"}

    def close(self) -> None:
        if self.launched:
            from dbos import DBOS

            DBOS.destroy()


# -- raw Redis: the floor for durability ----------------------------------------------------------


def raw_key(key: str) -> str:
    return f"raw:{{{key}}}:messages"


class RawRedis(System):
    name = "raw-redis"

    def __init__(self) -> None:
        self.clients: dict[str, Any] = {}

    def _client(self, url: str) -> Any:
        import redis

        if url not in self.clients:
            self.clients[url] = redis.Redis.from_url(url)
        return self.clients[url]

    @staticmethod
    def _loop(r: Any, key: str, n: int, k: int, pending: dict[str, Any] | None) -> str:
        import msgpack

        lk = raw_key(key)
        while True:
            if pending is None:
                content, call = W.model_turn(k, n, key)
                r.rpush(lk, msgpack.packb({"role": "assistant", "content": content,
                                           "tool_call": call}))
                if call is None:
                    return content
            else:
                call = pending
                pending = None
            W.maybe_crash(k, key)
            out = W.tool_result(k)
            r.rpush(lk, msgpack.packb({"role": "tool", "content": out,
                                       "tool_call_id": call["id"]}))
            k += 1

    def run(self, n: int, key: str, variant: dict[str, Any]) -> dict[str, Any]:
        import msgpack

        r = self._client(variant["redis_url"])
        t0 = time.monotonic()
        r.rpush(raw_key(key), msgpack.packb({"role": "user", "content": W.task_text(n, key)}))
        out = self._loop(r, key, n, 0, None)
        return {"t0": t0, "t_end": time.monotonic(), "result": out, "status": "finished"}

    def resume(self, key: str, variant: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        import msgpack
        import redis

        r = redis.Redis.from_url(variant["redis_url"])
        msgs = [msgpack.unpackb(x) for x in r.lrange(raw_key(key), 0, -1)]
        n, _ = W.parse_task(msgs[0]["content"])
        k = sum(1 for m in msgs if m["role"] == "tool")
        last = msgs[-1]
        pending = last.get("tool_call") if last["role"] == "assistant" else None
        out = self._loop(r, key, n, k, pending)
        t_end = time.monotonic()
        r.close()
        return {"t0": t0, "t_end": t_end, "result": out, "status": "finished"}

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


def preload(system: str) -> None:
    """Import what ``system`` needs before any clock starts: a resumed process has paid
    for its imports before it can do anything, whatever the system."""
    import msgpack  # noqa: F401
    import redis  # noqa: F401

    if system == "undying-inline":
        import undying.testing  # noqa: F401
        from undying.persistence import RedisStore  # noqa: F401
    elif system == "langgraph-pg":
        import langchain_core.messages  # noqa: F401
        import langgraph.checkpoint.postgres  # noqa: F401
        import psycopg  # noqa: F401

        from . import _peers_lg_graph  # noqa: F401
    elif system == "dbos":
        import dbos  # noqa: F401

        _dbos_register()


SYSTEMS: dict[str, type[System]] = {
    s.name: s for s in (UndyingInline, LangGraphPG, DBOSPG, RawRedis)}
