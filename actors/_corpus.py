"""Search and read over a folder of text documents (the demo's corpus tools).

The bundled corpus ships in the package; ``config["corpus_dir"]`` on an
agent points the tools at another folder. Scoring is plain term overlap:
deterministic, dependency-free and enough for the demo.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ._tools import ToolContext, tool

_WORD = re.compile(r"[a-z0-9][a-z0-9\-']*")
STOPWORDS = frozenset(
    "a an and are as at be by can do does for from how in is it its of on or that the this "
    "to what when where which who why with without after before than then there these those "
    "they their them into about over under between each every all any some most more less "
    "not no yes was were will would should could may might must has have had been being "
    "use used using work works".split()
)


def terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS and len(w) > 1]


def sentences(text: str) -> list[str]:
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", body) if len(s.strip()) > 20]


def bundled_corpus() -> Path:
    return Path(str(resources.files("undying.actors") / "corpus"))


@lru_cache(maxsize=8)
def load_corpus(folder: str) -> dict[str, tuple[str, str]]:
    """doc id -> (title, text)."""
    docs: dict[str, tuple[str, str]] = {}
    for path in sorted(Path(folder).glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        first = text.splitlines()[0] if text else path.stem
        docs[path.stem] = (first.lstrip("# ").strip(), text)
    return docs


def _folder(ctx: ToolContext) -> str:
    return str(ctx.config.get("corpus_dir") or bundled_corpus())


def score(query: str, text: str) -> float:
    q = set(terms(query))
    if not q:
        return 0.0
    words = terms(text)
    return sum(1.0 for w in words if w in q) / (1 + len(words) ** 0.5)


@tool(side_effect="idempotent")
def search(query: str, ctx: ToolContext, limit: int = 3) -> str:
    """Search the document corpus; returns the best matching documents with a snippet."""
    docs = load_corpus(_folder(ctx))
    ranked = sorted(((score(query, title + " " + text), doc) for doc, (title, text) in docs.items()),
                    key=lambda x: (-x[0], x[1]))
    hits = []
    for s, doc in ranked[: max(1, min(limit, 10))]:
        if s <= 0:
            continue
        title, text = docs[doc]
        best = max(sentences(text), key=lambda x: score(query, x), default="")
        hits.append({"doc": doc, "title": title, "score": round(s, 3), "snippet": best[:240]})
    return json.dumps({"query": query, "hits": hits})


@tool(side_effect="idempotent")
def read(doc: str, ctx: ToolContext) -> str:
    """Read one document of the corpus by its id (as returned by search)."""
    docs = load_corpus(_folder(ctx))
    if doc not in docs:
        raise ValueError(f"no document {doc!r}; search first to find document ids")
    return docs[doc][1][:6000]
