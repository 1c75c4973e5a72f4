"""The model configuration loader: what a file and the variables become, and what it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from undying import cli
from undying._model_config import (
    OPTION_TYPES,
    ModelConfigError,
    load_model_config,
    parse_model_config,
)
from undying.actors import ModelSpec, SecretRef
from undying.actors._http import RETRY_OPTIONS
from undying.actors.anthropic import AnthropicModel
from undying.actors.research import agent as research
from undying.actors.research import lead

KEY = "sk-unit-secret-0a9b8c7d6e5f"
BASE = {"provider": "openai", "base_url": "http://127.0.0.1:8700/v1", "model": "gpt-x"}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "model.toml"
    p.write_text(text)
    return p


def refused(data: dict[str, Any], *parts: str) -> str:
    with pytest.raises(ModelConfigError) as exc:
        parse_model_config(data, "m.toml")
    msg = str(exc.value)
    for part in parts:
        assert part in msg, msg
    return msg


def test_a_file_becomes_specs_for_the_agent_and_its_subagents(tmp_path: Path) -> None:
    path = write(tmp_path, '''
provider = "openai"
base_url = "https://api.example.com/v1"
model = "big"
api_key_env = "EXAMPLE_KEY"
timeout_s = 30
max_attempts = 5
rpm = 600
price_in_per_mtok = 0.15
failover_after = 2

[subagents]
model = "small"
max_tokens = 512

[fallback]
provider = "anthropic"
base_url = "https://api.anthropic.com"
model = "claude"
api_key_env = "ANTHROPIC_KEY"
anthropic_version = "2023-06-01"
''')
    c = load_model_config(path, env={})
    assert c is not None
    fallback = {"provider": "anthropic", "name": "claude", "base_url": "https://api.anthropic.com",
                "api_key": {"env": "ANTHROPIC_KEY"}, "options": {"anthropic_version": "2023-06-01"}}
    assert c.model == ModelSpec(
        provider="openai", name="big", base_url="https://api.example.com/v1",
        api_key=SecretRef(env="EXAMPLE_KEY"),
        options={"timeout_s": 30, "max_attempts": 5, "rpm": 600, "price_in_per_mtok": 0.15,
                 "failover_after": 2, "fallback": fallback})
    # what [subagents] does not say is the top level's
    assert c.subagent_model == c.model.model_copy(update={
        "name": "small", "options": {**c.model.options, "max_tokens": 512}})
    assert c.key_envs() == ["EXAMPLE_KEY", "ANTHROPIC_KEY"]
    assert c.missing_keys({"EXAMPLE_KEY": "x"}) == ["ANTHROPIC_KEY"]
    shown = "\n".join(c.describe())
    assert "model: openai 'big' at https://api.example.com/v1, key from $EXAMPLE_KEY" in shown
    assert "sub-agents: openai 'small'" in shown and str(path) in shown


def test_subagents_on_another_provider_inherit_nothing() -> None:
    c = parse_model_config({**BASE, "api_key_env": "K", "timeout_s": 9,
                            "subagents": {"provider": "scripted", "model": "research"}})
    assert c.subagent_model == ModelSpec(provider="scripted", name="research")


def test_variables_override_the_file_and_alone_are_a_configuration(tmp_path: Path) -> None:
    path = write(tmp_path, 'provider = "openai"\nbase_url = "http://a/v1"\nmodel = "m"\n'
                           '[subagents]\nmodel = "s"\n')
    env = {"UNDYING_MODEL_CONFIG": str(path), "UNDYING_BASE_URL": "http://b/v1",
           "UNDYING_API_KEY_ENV": "MY_KEY", "UNDYING_SUBAGENT_MODEL": "t"}
    c = load_model_config(None, env=env)
    assert c is not None
    assert (c.model.base_url, c.model.name, c.model.api_key) == ("http://b/v1", "m",
                                                                 SecretRef(env="MY_KEY"))
    assert (c.subagent_model.base_url, c.subagent_model.name) == ("http://b/v1", "t")
    assert c.source == f"{path} + $UNDYING_BASE_URL + $UNDYING_API_KEY_ENV + $UNDYING_SUBAGENT_MODEL"

    alone = load_model_config(None, env={"UNDYING_PROVIDER": "anthropic", "UNDYING_MODEL": "c",
                                         "UNDYING_BASE_URL": "http://h:1"})
    assert alone is not None and alone.model.provider == "anthropic"
    assert alone.subagent_model == alone.model
    assert load_model_config(None, env={"OTHER": "1"}) is None


def test_apply_replaces_the_model_of_the_agent_and_of_the_tree_below() -> None:
    c = parse_model_config({**BASE, "api_key_env": "K", "subagents": {"model": "small"}})
    applied = c.apply(lead)
    assert applied.ref == lead.ref and applied.tools == lead.tools
    ctx = applied.context()
    assert ctx.model == c.model and ctx.subagent_model == c.subagent_model
    assert lead.model.provider == "scripted" and lead.subagent_model is None  # untouched
    alone = c.apply(research)  # it delegates to no one
    assert alone.context().model == c.model and alone.context().subagent_model is None


@pytest.mark.parametrize("data, parts", [
    ({**BASE, "provider": "azure"}, ["m.toml: field 'provider': unknown provider 'azure'",
                                     "openai, anthropic, scripted"]),
    ({"model": "m"}, ["field 'provider': missing"]),
    ({**BASE, "base_url": None}, ["field 'base_url': must be a string"]),
    ({"provider": "anthropic", "model": "m"}, ["field 'base_url': missing",
                                               "https://api.anthropic.com"]),
    ({"provider": "openai", "base_url": "http://h/v1"}, ["field 'model': missing"]),
    ({**BASE, "base_url": "127.0.0.1:8700"}, ["field 'base_url'", "not an http"]),
    ({**BASE, "base_url": "https://u:pw@h/v1"}, ["field 'base_url': has credentials"]),
    ({**BASE, "base_url": "https://h/v1?api_key=abc"}, ["key-like query parameter"]),
    ({**BASE, "timeout": 3}, ["field 'timeout': unknown for provider 'openai'", "timeout_s"]),
    ({**BASE, "latency_s": 1}, ["field 'latency_s': unknown for provider 'openai'"]),
    ({**BASE, "rpm": "600"}, ["field 'rpm': must be a number, not a string"]),
    ({**BASE, "max_attempts": 2.5}, ["field 'max_attempts': must be an integer"]),
    ({**BASE, "temperature": True}, ["must be a number, not a boolean"]),
    ({**BASE, "max_attempts": 0}, ["field 'max_attempts': must be at least 1"]),
    ({**BASE, "timeout_s": 0}, ["field 'timeout_s': must be more than 0"]),
    ({**BASE, "anthropic_version": "x"}, ["unknown for provider 'openai'"]),
    ({**BASE, "subagents": "small"}, ["field 'subagents': must be a table"]),
    ({**BASE, "subagents": {"provider": "anthropic", "model": "c"}},
     ["field 'subagents.base_url': missing"]),
    ({**BASE, "fallback": {"provider": "nope", "model": "c"}},
     ["field 'fallback.provider': unknown provider 'nope'"]),
    ({"provider": "scripted", "model": "research", "base_url": "http://h"},
     ["field 'base_url': the scripted model is offline"]),
    ({"provider": "scripted", "model": "research", "fallback": {}}, ["field 'fallback': unknown"]),
    ({"provider": "scripted", "model": "poet"}, ["m.toml: model 'poet'", "no scripted policy"]),
])
def test_mistakes_are_refused_naming_the_file_and_the_field(data: dict[str, Any],
                                                            parts: list[str]) -> None:
    refused(data, *parts)


@pytest.mark.parametrize("field", ["api_key", "API-KEY", "token", "password", "key"])
def test_a_key_in_the_file_is_refused_and_never_echoed(field: str) -> None:
    msg = refused({**BASE, field: KEY}, f"field {field!r}", "api_key_env")
    assert KEY not in msg


def test_a_key_given_as_api_key_env_is_refused_and_never_echoed() -> None:
    msg = refused({**BASE, "api_key_env": KEY}, "field 'api_key_env'", "NAME of an environment")
    assert KEY not in msg
    msg = refused({**BASE, "temperature": KEY}, "must be a number")
    assert KEY not in msg


def test_the_key_pasted_into_another_field_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, f'provider = "openai"\nbase_url = "http://h/v1"\nmodel = "{KEY}"\n'
                           'api_key_env = "MY_KEY"\n')
    with pytest.raises(ModelConfigError) as exc:
        load_model_config(path, env={"MY_KEY": KEY})
    assert "contains the value of $MY_KEY" in str(exc.value) and KEY not in str(exc.value)


def test_the_file_itself_unreadable_or_not_toml(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="no such file"):
        load_model_config(tmp_path / "absent.toml", env={})
    bad = write(tmp_path, 'provider = "openai"\nmodel = \n')
    with pytest.raises(ModelConfigError) as exc:
        load_model_config(bad, env={})
    assert f"{bad}: not valid TOML" in str(exc.value) and "line 2" in str(exc.value)
    with pytest.raises(ModelConfigError, match=r"\$UNDYING_MODEL: field 'provider': missing"):
        load_model_config(None, env={"UNDYING_MODEL": "m"})


def test_every_provider_option_is_configurable_and_none_is_invented() -> None:
    assert set(OPTION_TYPES["http"]) == RETRY_OPTIONS - {"fallback"}
    assert set(OPTION_TYPES["anthropic"]) == set(AnthropicModel.extra_options)
    every = {name: 5 for name in OPTION_TYPES["http"]}
    c = parse_model_config({"provider": "anthropic", "base_url": "http://h", "model": "m",
                            "anthropic_version": "2023-06-01", **every})
    assert set(c.model.options) == set(every) | {"anthropic_version"}
    s = parse_model_config({"provider": "scripted", "model": "research", "latency_s": 0.1,
                            "latency_max_s": 0.2})
    assert s.model.options == {"latency_s": 0.1, "latency_max_s": 0.2}


def test_the_cli_refuses_a_bad_configuration_before_it_connects(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def no_client() -> None:
        raise AssertionError("connected despite a bad model configuration")

    monkeypatch.setattr(cli, "_client", no_client)
    monkeypatch.delenv("UNDYING_RAY_ADDRESS", raising=False)
    bad = write(tmp_path, f'provider = "openai"\nbase_url = "http://h/v1"\nmodel = "m"\n'
                          f'api_key = "{KEY}"\n')
    assert cli.main(["run", "a task", "--model-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"undying: error: {bad}: field 'api_key'" in err and KEY not in err

    unset = write(tmp_path, 'provider = "openai"\nbase_url = "http://h/v1"\nmodel = "m"\n'
                            'api_key_env = "UD_UNIT_UNSET_KEY"\n')
    monkeypatch.delenv("UD_UNIT_UNSET_KEY", raising=False)
    assert cli.main(["demo", "--model-config", str(unset)]) == 1
    assert "$UD_UNIT_UNSET_KEY (named by the model configuration" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_the_readme_example_is_a_valid_configuration() -> None:
    import tomllib

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    text = readme.split("```toml\n# model.toml\n", 1)[1].split("```", 1)[0]
    c = parse_model_config(tomllib.loads(text), "README.md")
    assert (c.model.provider, c.model.name, c.model.api_key) == (
        "openai", "gpt-4o-mini", SecretRef(env="OPENAI_API_KEY"))
    assert c.model.options["fallback"]["provider"] == "anthropic"
