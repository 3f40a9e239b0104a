"""Command-line flags generated from the run-config tree (:mod:`lcm.config.run`), and the tree built back from the
flags a user typed, a ``--config`` file or the run being resumed. No default, range or help text is written here:
each comes from its knob."""

from __future__ import annotations

import argparse
import dataclasses
import json
from enum import Enum
from pathlib import Path
from typing import Any

from lcm.config.knobs import _unwrap, flag_of, knobs, leaves, override
from lcm.config.run import RunConfig, section_classes

__all__ = ["add_knob_flags", "add_run_flags", "add_section_flags", "flag_paths", "run_config_from", "typed_settings"]

SECTIONS = (  # (section, title of its group in --help)
    ("student", "student"),
    ("method", "method"),
    ("data", "data"),
    ("optim", "optimiser"),
    ("loop", "training loop"),
    ("validation", "validation"),
)
MODEL_FLAG = {"distill": "teacher", "finetune": "model", "tune": "model"}


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _default_text(f: dataclasses.Field, k) -> str:
    if k.default_text is not None:
        return k.default_text
    value = f.default
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    if isinstance(value, bool):
        return "off" if not value else "on"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def add_section_flags(
    parser, cls: type, prefix: str, title: str | None, only: tuple[str, ...] | None = None, default: str | None = None
) -> None:
    group = parser.add_argument_group(title) if title else parser
    for f, k, tp in knobs(cls):
        if only is not None and f.name not in only:
            continue
        base, _ = _unwrap(tp)
        kw: dict[str, Any] = {"dest": prefix + f.name, "default": argparse.SUPPRESS}
        kw["help"] = f"{k.help} (default: {default or _default_text(f, k)})".replace("%", "%%")
        if base is not bool:
            kw["metavar"] = f.name.upper()
        if base is bool:
            kw["action"] = "store_true"
        elif k.repeat:
            kw["action"] = "append"
        elif getattr(base, "__origin__", None) is tuple:
            kw["type"] = _comma_list
        elif isinstance(base, type) and issubclass(base, Enum):
            kw["choices"] = [m.value for m in base]
        elif k.choices is not None:  # checked by the tree, in one line; listed here
            kw["help"] = kw["help"].replace(" (default:", f"; one of {', '.join(k.choices)} (default:", 1)
        elif base in (int, float):
            kw["type"] = base
        if "choices" in kw:
            del kw["metavar"]  # the choices are the metavar
        group.add_argument(flag_of(f), **kw)


def add_run_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """Every knob of ``command``'s run-config tree as a flag (grouped by section), with ``--out``, ``--config``
    and ``--resume``. A flag left out is absent from the parsed namespace, so typed flags are known."""
    parser.add_argument(
        "--out",
        required=True,
        help="run folder: the exported model, and train/ (checkpoints, logs, validation grids, run_config.json)",
    )
    parser.add_argument(
        "--config",
        help="start from the settings of a run_config.json, or a JSON object of settings by flag name (batch_size) "
        "or dotted path (data.batch_size); flags typed here override it",
    )
    parser.add_argument(
        "--resume",
        help="'latest' or a checkpoint folder: continue exactly where it stopped, with the run's saved settings "
        "(only --out is needed; refused when there is nothing to resume). 'auto': resume when --out holds a "
        "checkpoint, else start. Without --resume, a folder that holds another run or a model is refused",
    )
    sections = section_classes(command)
    for name, title in SECTIONS:
        add_section_flags(parser, sections[name], name + ".", title)


def add_knob_flags(parser: argparse.ArgumentParser, paths: tuple[str, ...], default: str | None = None) -> None:
    """Flags for the knobs at dotted ``paths`` of the distillation tree only (``lcm demo``'s few, ``lcm cache``'s
    data settings); ``default`` replaces what their help says of the default (a recipe's)."""
    classes = section_classes("distill")
    for section in dict.fromkeys(p.split(".")[0] for p in paths):
        names = tuple(p.split(".", 1)[1] for p in paths if p.startswith(section + "."))
        add_section_flags(parser, classes[section], section + ".", None, names, default)


def typed_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings typed on the command line, by dotted path."""
    return {k: v for k, v in vars(args).items() if "." in k}


def flag_paths(command: str) -> dict[str, str]:
    """``{flag name without dashes, as a Python name: dotted path}`` of ``command``'s tree (``batch_size`` →
    ``data.batch_size``), for ``--config`` files written with flag names."""
    return {flag_of(f).lstrip("-").replace("-", "_"): path for path, f, _ in leaves(RunConfig(command=command))}


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value.value if isinstance(value, Enum) else value)


def _config_file(path: str, command: str) -> RunConfig:
    """The tree of a ``--config`` file: a saved run_config.json, or settings by flag name or dotted path."""
    try:
        record = json.loads(Path(path).expanduser().read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as err:
        raise ValueError(f"--config {path}: not a readable JSON file ({type(err).__name__})") from None
    if not isinstance(record, dict):
        raise ValueError(f"--config {path} must hold a JSON object of settings")
    if any(isinstance(v, dict) for v in record.values()):  # a saved run's tree
        if record.get("command", command) != command:
            raise ValueError(f"--config {path} is the configuration of an lcm {record['command']} run, not {command}")
        tree = {k: v for k, v in record.items() if k != "data_resolved"}
        return RunConfig.from_dict({**tree, "command": command}, f"--config {path}")
    paths, changes = flag_paths(command), {}
    for key, value in record.items():
        name = key.lstrip("-").replace("-", "_")
        if name not in paths and key not in paths.values():
            raise ValueError(f"--config {path}: unknown setting(s) {key} for lcm {command}")
        changes[paths.get(name, key)] = value
    try:
        return override(RunConfig(command=command), changes)
    except ValueError as err:
        raise ValueError(f"--config {path}: {err}") from None


def _value(tree: RunConfig, path: str) -> Any:
    for part in path.split("."):
        tree = getattr(tree, part)
    return tree


def run_config_from(args: argparse.Namespace, command: str) -> RunConfig:
    """The run-config tree of a ``distill`` / ``finetune`` command line: the run being resumed (its record), a
    ``--config`` file or the defaults, with the typed flags on top. A typed flag that would change a resumed run is
    refused in one line naming it (what a resume may change aside)."""
    from lcm.training.loop import train_dir
    from lcm.training.run_folder import RESUME_MAY_CHANGE, RUN_CONFIG, read_run_record

    typed = typed_settings(args)
    model = getattr(args, MODEL_FLAG[command], None)
    saved = read_run_record(train_dir(Path(args.out))) if args.resume else None
    if saved is not None:
        where = train_dir(Path(args.out)) / RUN_CONFIG
        if args.config:
            raise ValueError(f"--config starts a run; --resume takes the run's own settings from {where}")
        if saved.get("command") != command:
            raise ValueError(f"{args.out} is an lcm {saved.get('command')} run: resume it with that command")
        base = RunConfig.from_dict({k: v for k, v in saved.items() if k != "data_resolved"}, str(where))
        resumed = override(base, typed)
        for path, f, _ in leaves(base):
            if path in typed and path not in RESUME_MAY_CHANGE and _value(resumed, path) != _value(base, path):
                raise ValueError(
                    f"{flag_of(f)} {_show(_value(resumed, path))} differs from this run's "
                    f"{_show(_value(base, path))} (saved in {where}): drop the flag to resume, or start a new --out"
                )
        if model is not None and _where(model) != _where(base.model):
            raise ValueError(
                f"--{MODEL_FLAG[command]} {model} differs from this run's {base.model} (saved in {where}): drop the "
                "flag to resume, or start a new --out"
            )
        return resumed
    base = _config_file(args.config, command) if args.config else RunConfig(command=command)
    cfg = override(base, typed)
    return dataclasses.replace(cfg, model=model) if model is not None else cfg


def _where(model: str | None) -> str | None:
    """A model string as the folder it names (the shipped teacher for None), or the hub id it is."""
    from lcm.locations import local_path_or_none
    from lcm.shipped import default_model_path

    local = local_path_or_none(str(model or default_model_path()))
    return str(local.resolve()) if local is not None else model
