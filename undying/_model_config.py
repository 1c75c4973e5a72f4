"""Which model the CLI's runs use: a TOML file and environment variables, never code.

    # model.toml (UNDYING_MODEL_CONFIG=model.toml, or --model-config model.toml)
    provider = "openai"                   # openai | anthropic | scripted
    base_url = "https://api.openai.com/v1"
    model = "gpt-4o-mini"
    api_key_env = "OPENAI_API_KEY"        # the NAME of the variable that holds the key
    timeout_s = 60                        # and any other option of `ModelSpec.options`
    rpm = 500

    [subagents]                           # optional: what sub-agents use instead
    model = "gpt-4o-mini"

    [fallback]                            # optional: after `failover_after` failures
    provider = "anthropic"
    ...

Environment variables override the file's top level: ``UNDYING_PROVIDER``,
``UNDYING_BASE_URL``, ``UNDYING_MODEL``, ``UNDYING_API_KEY_ENV`` and
``UNDYING_SUBAGENT_MODEL``; with no file they are the whole configuration.

The result is a `ModelSpec` whose key is a `SecretRef` (a variable's name):
it goes into every checkpoint of the runs it starts, so nothing secret may be
in it. A key written into the file is refused, never echoed; so is a base URL
with credentials in it. Every option is checked here, by building the model
the executors will build, so a typo fails before any run starts rather than
at each run's first model call.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from undying.actors import Agent, ModelSpec, SecretRef, build_model
from undying.actors._http import RETRY_OPTIONS, public_url
from undying.actors._models import ModelConfigError
from undying.actors.anthropic import AnthropicModel

__all__ = ["ENV_VARS", "OPTION_TYPES", "ModelConfig", "ModelConfigError", "load_model_config",
           "parse_model_config"]

CONFIG_ENV = "UNDYING_MODEL_CONFIG"
# environment variable -> field of the file's top level ("subagents.model": the [subagents] table)
ENV_VARS = {
    "UNDYING_PROVIDER": "provider",
    "UNDYING_BASE_URL": "base_url",
    "UNDYING_MODEL": "model",
    "UNDYING_API_KEY_ENV": "api_key_env",
    "UNDYING_SUBAGENT_MODEL": "subagents.model",
}
PROVIDERS = ("openai", "anthropic", "scripted")
HTTP_PROVIDERS = ("openai", "anthropic")

# The options a provider reads from ModelSpec.options, with their types. The HTTP ones are
# `_http.RETRY_OPTIONS` ("fallback" is the [fallback] table); one added there is accepted
# here as a number until it is listed (a unit test pins that nothing here is invented).
_NUMBER: tuple[type, ...] = (int, float)
_INT: tuple[type, ...] = (int,)
_STR: tuple[type, ...] = (str,)
_WANT = {_NUMBER: "a number", _INT: "an integer", _STR: "a string"}
_HTTP_TYPES = {"max_attempts": _INT, "malformed_retries": _INT, "failover_after": _INT,
               "max_tokens": _INT}
OPTION_TYPES: dict[str, dict[str, tuple[type, ...]]] = {
    "http": {name: _HTTP_TYPES.get(name, _NUMBER) for name in sorted(RETRY_OPTIONS - {"fallback"})},
    "anthropic": dict.fromkeys(AnthropicModel.extra_options, _STR),  # anthropic_version
    "scripted": {"latency_s": _NUMBER, "latency_max_s": _NUMBER},
}
# lowest allowed value (and whether it is allowed itself); every other number: at least 0
_MINIMUM: dict[str, tuple[float, bool]] = {
    "max_attempts": (1, True), "failover_after": (1, True), "max_tokens": (1, True),
    "timeout_s": (0, False), "connect_timeout_s": (0, False), "rpm": (0, False),
    "tpm": (0, False), "rpm_burst": (0, False), "tpm_burst": (0, False)}
_SPEC_FIELDS = ("provider", "model", "base_url", "api_key_env")
# fields people write a key into; refused with a pointer to api_key_env, the value never shown
_SECRET_FIELDS = frozenset({"api_key", "apikey", "key", "token", "access_token", "secret",
                            "password", "authorization", "bearer", "x_api_key", "x-api-key"})
_SECRET_PARAMS = re.compile(r"key|token|secret|sig|password|auth", re.IGNORECASE)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class ModelConfig:
    """The model of the runs the CLI starts, and of their sub-agents."""

    model: ModelSpec
    subagent_model: ModelSpec
    source: str  # where it came from: the file and/or the variables, for messages

    def apply(self, agent: Agent) -> Agent:
        """``agent`` with this model, and its sub-agents (the whole tree below) with theirs.

        A copy under the same importable name: executors import the agent for its tools,
        and take the model from the run's checkpoint, where this spec is stored.
        """
        ref = agent.ref
        out = copy.copy(agent)
        out._ref = ref
        out.model = self.model
        out.subagent_model = self.subagent_model if agent.subagent is not None else None
        return out

    def describe(self) -> list[str]:
        """What a user should see: provider, model, base URL, which variable holds the key."""
        lines = [f"model: {describe_spec(self.model)}"]
        if self.subagent_model != self.model:
            lines.append(f"sub-agents: {describe_spec(self.subagent_model)}")
        else:
            lines.append("sub-agents: the same model")
        lines.append(f"model configuration: {self.source}")
        return lines

    def key_envs(self) -> list[str]:
        """The variables named for keys, fallbacks included."""
        names: list[str] = []
        for top in (self.model, self.subagent_model):
            spec: ModelSpec | None = top
            while spec is not None:
                if spec.api_key is not None and spec.api_key.env not in names:
                    names.append(spec.api_key.env)
                fb = spec.options.get("fallback")
                spec = ModelSpec.model_validate(fb) if fb is not None else None
        return names

    def missing_keys(self, env: Mapping[str, str] | None = None) -> list[str]:
        """Variables named for keys that are not set in ``env`` (this process's environment)."""
        env = os.environ if env is None else env
        return [name for name in self.key_envs() if not env.get(name)]


def describe_spec(spec: ModelSpec) -> str:
    text = f"{spec.provider} {spec.name!r}"
    if spec.base_url:
        text += f" at {public_url(spec.base_url)}"
    if spec.api_key is not None:
        text += f", key from ${spec.api_key.env}"
    fb = spec.options.get("fallback")
    if fb is not None:
        text += f"; fallback {describe_spec(ModelSpec.model_validate(fb))}"
    return text


def load_model_config(path: str | Path | None = None,
                      env: Mapping[str, str] | None = None) -> ModelConfig | None:
    """The configuration from ``path`` (else ``$UNDYING_MODEL_CONFIG``) and the variables
    of `ENV_VARS`; None when neither is given (the agent keeps its own model)."""
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_ENV):
        path = env[CONFIG_ENV]
    data: dict[str, Any] = {}
    source = ""
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ModelConfigError(f"model configuration {p}: no such file") from None
        except OSError as exc:
            raise ModelConfigError(f"model configuration {p}: cannot read it "
                                   f"({exc.strerror})") from None
        except UnicodeDecodeError:
            raise ModelConfigError(f"model configuration {p}: not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ModelConfigError(f"model configuration {p}: not valid TOML: {exc}") from None
    overrides = {var: env[var] for var in ENV_VARS if env.get(var)}
    if path is None and not overrides:
        return None
    config = parse_model_config(data, source, overrides)
    # a key pasted into some other field (the model name, a URL) would be stored with every run
    for name in config.key_envs():
        value = env.get(name, "")
        if len(value) >= 8 and any(value in s for s in _strings(data)):
            raise ModelConfigError(f"{source}: contains the value of ${name}, the API key; "
                                   "remove it: the configuration names the variable, never its value")
    return config


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def parse_model_config(data: Mapping[str, Any], source: str = "",
                       overrides: Mapping[str, str] | None = None) -> ModelConfig:
    """``data`` as read from a TOML file named ``source``; ``overrides`` by variable name."""
    where = source or "model configuration"
    top = dict(data)
    subs = dict(_table(top.pop("subagents", None), where, "subagents"))
    top_origin = dict.fromkeys(top, where)
    sub_origin = dict.fromkeys(subs, where)
    for var, value in (overrides or {}).items():
        field = ENV_VARS[var]
        if field.startswith("subagents."):
            field = field.removeprefix("subagents.")
            subs[field], sub_origin[field] = value, f"${var}"
        else:
            top[field], top_origin[field] = value, f"${var}"
    model = _spec(top, top_origin, "")
    if subs.get("provider", model.provider) == model.provider:
        # what [subagents] does not say is the top level's; naming another provider, it
        # stands alone (that provider's URL and key are not the top level's)
        subs, sub_origin = {**top, **subs}, {**top_origin, **sub_origin}
    sub = _spec(subs, sub_origin, "subagents.")
    label = " + ".join(([source] if source else []) + [f"${v}" for v in overrides or {}])
    return ModelConfig(model=model, subagent_model=sub, source=label)


def _table(value: Any, where: str, name: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ModelConfigError(f"{where}: field {name!r}: must be a table ([{name}]), "
                               f"not a {type(value).__name__}")
    return value


def _spec(raw: Mapping[str, Any], origin: Mapping[str, str], prefix: str) -> ModelSpec:
    """One model spec from one table; ``prefix`` names the table in messages."""

    anywhere = ", ".join(sorted(set(origin.values()))) or "model configuration"

    def fail(field: str, problem: str) -> ModelConfigError:
        return ModelConfigError(f"{origin.get(field, anywhere)}: "
                                f"field {prefix + field!r}: {problem}")

    for field in raw:
        if field.lower().replace("-", "_") in _SECRET_FIELDS:
            raise fail(field, "a key never goes in the configuration (it would be stored with "
                             "every run); put it in an environment variable and name that "
                             "variable in api_key_env, e.g. api_key_env = \"OPENAI_API_KEY\"")
    provider = raw.get("provider")
    if provider is None:
        raise fail("provider", f"missing; one of {', '.join(PROVIDERS)}")
    if provider not in PROVIDERS:
        raise fail("provider", f"unknown provider {provider!r}; one of {', '.join(PROVIDERS)}")
    types = OPTION_TYPES["scripted"] if provider == "scripted" else {
        **OPTION_TYPES["http"], **OPTION_TYPES.get(provider, {})}
    known = set(_SPEC_FIELDS) | set(types) | ({"fallback"} if provider != "scripted" else set())
    for field in raw:
        if field not in known:
            raise fail(field, f"unknown for provider {provider!r}; known: "
                              f"{', '.join(sorted(known))}")
    for field in _SPEC_FIELDS:
        if field in raw and not isinstance(raw[field], str):
            raise fail(field, f"must be a string, not {_kind(raw[field])}")
    name: str = raw.get("model") or ""
    if not name.strip():
        raise fail("model", "missing: the model's name as the provider knows it"
                   + (" (a scripted policy: research, research-lead, fanout)"
                      if provider == "scripted" else ""))
    base_url = raw.get("base_url")
    key_env = raw.get("api_key_env")
    if provider == "scripted":
        for f in ("base_url", "api_key_env"):
            if raw.get(f):
                raise fail(f, "the scripted model is offline: it has no URL and no key")
    else:
        if not base_url:
            default = {"openai": "https://api.openai.com/v1",
                       "anthropic": "https://api.anthropic.com"}[provider]
            raise fail("base_url", f"missing: where the {provider} API is "
                                   f"(e.g. {default}, or a local server)")
        _check_url(base_url, fail)
        if key_env is not None and not _ENV_NAME.fullmatch(key_env):
            # not echoed: a value that is no variable name may well be the key itself
            raise fail("api_key_env", "must be the NAME of an environment variable (letters, "
                                      "digits, _), like OPENAI_API_KEY; the key itself goes in "
                                      "that variable, never in the configuration")
    options: dict[str, Any] = {}
    for opt, kinds in types.items():
        if opt not in raw:
            continue
        value = raw[opt]
        if isinstance(value, bool) or not isinstance(value, kinds):
            # the value is not shown: it could be anything pasted there
            raise fail(opt, f"must be {_WANT[kinds]}, not {_kind(value)}")
        least, inclusive = _MINIMUM.get(opt, (0, True))
        if kinds != _STR and (float(raw[opt]) < least
                              or (float(raw[opt]) == least and not inclusive)):
            raise fail(opt, f"must be {'at least' if inclusive else 'more than'} {least}, "
                            f"not {value}")
        options[opt] = value
    if "fallback" in raw:
        fb_where = origin.get("fallback", "?")
        fb_raw = _table(raw["fallback"], fb_where, prefix + "fallback")
        fb = _spec(fb_raw, dict.fromkeys(fb_raw, fb_where), prefix + "fallback.")
        options["fallback"] = fb.model_dump(mode="json")  # as `_http` reads it back
    spec = ModelSpec(provider=provider, name=name, base_url=base_url or None,
                     api_key=SecretRef(env=key_env) if key_env else None, options=options)
    try:
        # the construction the executors do: range checks, the fallback, a scripted policy
        build_model(spec)
    except (ModelConfigError, ValueError) as exc:
        raise ModelConfigError(f"{anywhere}: {prefix}model {name!r}: {exc}") from None
    return spec


def _kind(value: Any) -> str:
    return {bool: "a boolean", str: "a string", int: "an integer", float: "a number",
            dict: "a table", list: "an array"}.get(type(value), type(value).__name__)


def _check_url(url: str, fail: Any) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise fail("base_url", f"{public_url(url)!r} is not an http:// or https:// URL")
    if parts.username or parts.password:
        raise fail("base_url", "has credentials in it (user:password@); they would be stored "
                               "with every run: put the key in an environment variable named "
                               "by api_key_env")
    if any(_SECRET_PARAMS.search(k) for k, _ in parse_qsl(parts.query)):
        raise fail("base_url", "has a key-like query parameter; they would be stored with every "
                               "run: put the key in an environment variable named by api_key_env")

