"""Command-line options derived from a settings section, so that a setting is declared once,
in `hps.settings`: every field of the section becomes an option of the command (its name
with dashes, `--flag/--no-flag` for a boolean, its type, its description as help), and
pydantic validates the values as it validates the settings file's."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, get_args, get_origin

import typer

from cli.common import fail
from hps.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

# Spellings kept from before the options were derived (each beside the derived one).
ALIASES = {
    "learning_rate": "--lr",
    "max_train_steps": "--steps",
    "use_ema": "--ema/--no-ema",
    "include_contains_name": " /--exclude-contains-name",
}


def _option(section: str, name: str, field: Any) -> inspect.Parameter:
    flag = "--" + name.replace("_", "-")
    decls = [f"{flag}/--no-{flag[2:]}" if field.annotation is bool else flag]
    if name in ALIASES:
        decls.append(ALIASES[name])
    info = typer.Option(None, *decls, help=f"{field.description} ({section}.{name})")
    annotation = field.annotation
    if get_origin(annotation) is list and get_origin(get_args(annotation)[0]) is not None:
        annotation = list[str]  # typer takes no list of Literals: pydantic checks the values
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation | None
    )


def settings_options(section: str) -> Callable[[F], F]:
    """Give a typer command an option per field of the settings section `section` (e.g.
    "train"); the command receives those given on the command line as its `changes`
    argument (a dict), to pass to `apply_changes`."""
    fields = Settings.model_fields[section].annotation.model_fields  # type: ignore[union-attr]

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "changes"]
        params = own + [_option(section, name, field) for name, field in fields.items()]

        @functools.wraps(command)
        def wrapper(**values: Any) -> Any:
            given = {name: values.pop(name) for name in fields}
            changes = {k: v for k, v in given.items() if v is not None and v != []}
            return command(**values, changes=changes)

        # typer reads the signature and the annotations; not the wrapped command's.
        del wrapper.__wrapped__
        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper  # type: ignore[return-value]

    return decorate


def apply_changes(config: Settings, section: str, changes: dict[str, Any]) -> Settings:
    """The settings with the options given; a value the setting refuses exits with the
    option's name and why."""
    from pydantic import ValidationError

    try:
        return config.with_changes(section, **changes)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise fail(f"--{str(error['loc'][0]).replace('_', '-')}: {error['msg']}") from None
