"""Where undying finds Ray and Redis: environment first, embedded defaults otherwise.

  UNDYING_REDIS_URL     redis:// or rediss:// URL (ACL user and password in it);
                        unset: a private redis-server under UNDYING_HOME
  UNDYING_RAY_ADDRESS   Ray address (``auto``, ``ray://head:10001``); unset: a local Ray
  UNDYING_NAMESPACE     Ray namespace of run actors and the supervisor (``undying``)
  UNDYING_HOME          data folder for the embedded server (``~/.undying``)
  UNDYING_APPENDFSYNC   appendfsync of the embedded server: everysec (default) or always
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = None
    ray_address: str | None = None
    namespace: str = "undying"
    home: Path = Path.home() / ".undying"
    appendfsync: str = "everysec"
    num_cpus: int | None = None

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            redis_url=env.get("UNDYING_REDIS_URL") or None,
            ray_address=env.get("UNDYING_RAY_ADDRESS") or None,
            namespace=env.get("UNDYING_NAMESPACE", "undying"),
            home=Path(env["UNDYING_HOME"]) if env.get("UNDYING_HOME") else Path.home() / ".undying",
            appendfsync=env.get("UNDYING_APPENDFSYNC", "everysec"),
        )
