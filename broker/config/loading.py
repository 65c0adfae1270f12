"""Reading what the configuration is made of, as operators write it: files, the environment, secret files.

- **Files** are UTF-8 text (a bad byte is a :class:`ConfigError` naming the file and its offset) holding
  YAML read by the safe loader (libyaml's when PyYAML has it), which refuses a key given twice in one
  mapping, naming both lines: YAML itself lets the last one win, silently.
- **The environment** overrides any key of the file: ``MQTT_FRONT_`` then the key's path with ``__``
  between the levels, any case (``MQTT_FRONT_UPSTREAM__PASSWORD``, ``MQTT_FRONT_LIMITS__MAX_CONNECTIONS``,
  ``MQTT_FRONT_LISTENERS__0__BIND`` for an entry of a list by its index). pydantic-settings' environment
  source reads the variables; the values are merged over the file's data before it is validated, so an
  invalid value is reported like one in the file, naming the variable.
- **Secret files** (``upstream.password_file``): the secret is the file's first line, read at load, so on
  every reload too.

It must not know the models' fields: the caller passes the model (no import of ``broker.config``).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from broker.config.base import ConfigError

ENV_PREFIX = "MQTT_FRONT_"
ENV_NESTING = "__"

# Keys that say the same thing two ways: an environment variable for one replaces the other in the file
# (MQTT_FRONT_UPSTREAM__PASSWORD_FILE over a file's upstream.password is an override, not "both given").
_TWINS = {"password": "password_file", "token": "token_file", "secret": "secret_file", "url": "urls"}
_TWINS.update({twin: key for key, twin in list(_TWINS.items())})

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"

# libyaml's parser when PyYAML has it: the same documents, ~10x faster (a users file of 10,000 entries is
# read on every reload). The constructor (where keys are checked) is Python code in both.
try:
    from yaml import CSafeLoader as _BaseLoader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader as _BaseLoader  # type: ignore[assignment]


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice: ``duplicate key 'acl' on line 9 (first on line 2)``."""


class _UniqueKeyLoader(_BaseLoader):
    """The safe loader, refusing duplicate keys. Checked where merges (``<<``) are flattened, before the
    merged keys join the mapping's own: overriding a merged key is what merges are for."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()  # a mapping is flattened again when it is also a merge source

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        if id(node) not in self._checked:
            self._checked.add(id(node))
            first: dict[Hashable, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = key_node.value if key_node.tag == _STR_TAG else self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # the constructor refuses it with its own message
                line = key_node.start_mark.line + 1
                if key in first:
                    raise DuplicateKeyError(f"duplicate key {key!r} on line {line} (first on line {first[key]})")
                first[key] = line
        super().flatten_mapping(node)


def safe_load(text: str) -> Any:
    """YAML ``text`` as Python data (the safe subset); a key given twice is a :class:`DuplicateKeyError`."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: Path, key: str = "") -> Any:
    """The YAML document in ``path``; a :class:`ConfigError` (``key: `` first, when given) names the file and
    the problem: unreadable, not UTF-8 (the offset of the bad byte), not YAML, a duplicate key."""
    where = f"{key}: " if key else ""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}{path} is not UTF-8 text (a bad byte at offset {exc.start})") from None
    try:
        return safe_load(text)
    except DuplicateKeyError as exc:
        raise ConfigError(f"{where}{path}: {exc}: YAML would silently keep the last one") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}{path} is not valid YAML: {exc}") from None


def read_secret(path: Path, key: str) -> str:
    """The secret in ``path`` (its first line, stripped) for the key ``key`` (``upstream.password_file``)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from None
    line = data.split(b"\n", 1)[0]
    try:
        secret = line.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{key}: {path} is not UTF-8 text (a bad byte at offset {exc.start})") from None
    if not secret:
        raise ConfigError(f"{key}: {path} is empty (the secret is its first line)")
    return secret


# -- the environment ----------------------------------------------------------------------------------------


def env_name(path: tuple[str, ...]) -> str:
    """The variable that sets the key at ``path``: ("upstream", "password") -> MQTT_FRONT_UPSTREAM__PASSWORD."""
    return ENV_PREFIX + ENV_NESTING.join(part.upper() for part in path)


@functools.cache
def _settings_class(model: type[BaseModel]) -> type[BaseSettings]:
    """``model`` as pydantic-settings needs it to find the variables (never instantiated: the merged data
    is validated by ``model`` itself, with the file's error messages)."""
    config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTING, case_sensitive=False)

    def body(namespace: dict[str, Any]) -> None:
        namespace["model_config"] = config

    cls: type[BaseSettings] = types.new_class(f"{model.__name__}FromEnvironment", (BaseSettings, model), {}, body)
    return cls


def env_overrides(model: type[BaseModel]) -> dict[str, Any]:
    """The ``MQTT_FRONT_...`` variables set now, as nested data for ``model`` (values still text)."""
    try:
        return dict(EnvSettingsSource(_settings_class(model))())
    except ValueError as exc:  # pydantic-settings' SettingsError: a complex value that is not JSON
        raise ConfigError(f"environment: {exc}") from None


def apply_environment(data: Any, model: type[BaseModel]) -> tuple[Any, dict[tuple[str, ...], str]]:
    """``data`` (a file's) with the environment's overrides merged over it, and which variable set what:
    {key path: variable name}, for error messages. Data that is not a mapping is returned as it is."""
    overrides = env_overrides(model)
    if not overrides or not isinstance(data, dict | None):
        return data, {}
    sources: dict[tuple[str, ...], str] = {}
    return _merge(data or {}, overrides, (), sources), sources


def _first_leaf(value: Any, path: tuple[str, ...]) -> tuple[str, ...]:
    while isinstance(value, dict) and value:
        key, value = next(iter(value.items()))
        path = (*path, str(key))
    return path


def _merge(base: Any, over: Any, path: tuple[str, ...], sources: dict[tuple[str, ...], str]) -> Any:
    if not isinstance(over, dict):
        sources[path] = env_name(path)
        return over
    if isinstance(base, list):  # MQTT_FRONT_LISTENERS__0__BIND: an entry of the list, by its index
        merged_list = list(base)
        for key, value in over.items():
            if not str(key).isdigit() or int(key) >= len(merged_list):
                variable = env_name(_first_leaf(value, (*path, str(key))))
                dotted = ".".join(path)
                raise ConfigError(f"{variable}: {dotted} has no entry {key} (it has {len(merged_list)})")
            merged_list[int(key)] = _merge(merged_list[int(key)], value, (*path, str(key)), sources)
        return merged_list
    merged: dict[str, Any] = dict(base) if isinstance(base, Mapping) else {}
    for key, value in over.items():
        twin = _TWINS.get(key)
        if twin is not None and twin not in over:
            merged.pop(twin, None)
        merged[key] = _merge(merged.get(key), value, (*path, key), sources)
    return merged
