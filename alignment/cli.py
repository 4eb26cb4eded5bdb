"""The command-line entry points' shared wrapper: ``@entry_point("config")`` = Hydra's main on ``conf/`` + one-line
errors (``exit_on_error``) + the override check below, run before Hydra starts.

One-line errors for bad command-line overrides:

Hydra reports an unknown config-group option (``method=nope``) or a key that is not in the config
(``method.bta=1``) as a multi-line message with exit status 1. The entry points (``alignment.run``,
``alignment.generate``, ``alignment.evaluate``) call :func:`check_overrides` first: it checks every group choice
against ``conf/<group>/*.yaml`` and composes the config once with the given overrides (each sweep takes its first
value), and reports the first problem as one line, ``error: <key>: ...``, exit status 2. Anything it cannot parse,
or a custom config path / search path, is left to Hydra.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import sys
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def entry_point(config_name: str):
    """Decorate ``fn(cfg)`` into the ``main()`` of ``python -m alignment.<module>``: overrides are checked
    (``check_overrides``), then Hydra composes ``conf/<config_name>.yaml`` and calls ``fn``; an ``AlignmentError``
    becomes ``error: <message>``, exit status 2."""
    import hydra

    from alignment.errors import exit_on_error

    def decorate(fn):
        hydra_main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(exit_on_error(fn))

        @functools.wraps(fn)
        def main():
            check_overrides(sys.argv[1:], config_name)
            return hydra_main()

        return main

    return decorate


def _parse(argv: list[str]):
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with contextlib.redirect_stderr(io.StringIO()):  # argparse's own complaints are Hydra's to print
        args = get_args_parser().parse_args(argv)
    if args.config_dir or args.config_path or any("searchpath" in o for o in args.overrides):
        return None
    return OverridesParser.create().parse_overrides(args.overrides)


def group_choice_error(override) -> str | None:
    """The one-line message for ``group=<option>`` (or a sweep over options) naming an option that has no
    conf/<group>/<option>.yaml."""
    group = override.key_or_group
    folder = Path(CONF_DIR) / group
    if group == "hydra" or "/" in group or not folder.is_dir() or override.package or override.is_delete():
        return None
    if override.is_sweep_override():
        try:
            names = list(override.sweep_string_iterator())
        except Exception:  # noqa: BLE001 - not a plain choice sweep: left to Hydra
            return None
    else:
        value = override.value()
        names = value if isinstance(value, list) else [value]
    for name in names:
        if name is None or (isinstance(name, str) and name in ("null", "none") and group != "scorers"):
            continue
        if not isinstance(name, str) or name.startswith("_") or not (folder / f"{name}.yaml").is_file():
            available = ", ".join(sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_")))
            return f"{group}: unknown {group} config {name!r} (available in conf/{group}/: {available})"
    return None


def _as_single_run(override) -> str | None:
    """The override as a plain ``key=value`` (a sweep's first value), or None when that cannot be formed."""
    if not override.is_sweep_override():
        return override.input_line
    try:
        first = next(iter(override.sweep_string_iterator()))
    except Exception:  # noqa: BLE001 - interval sweeps and the like: left to Hydra
        return None
    return f"{override.get_key_element()}={first}"


def composition_error(error: BaseException) -> str:
    """A Hydra / OmegaConf composition error as one line that starts with the offending key when it is known."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    match = re.match(r"Could not override '([^']+)'", first)
    if match:
        key = match.group(1)
        return f"{key}: not a key of the config (a new key needs a '+': +{key}=...)"
    match = re.match(r"Could not append to config\. An item is already at '([^']+)'", first)
    if match:
        return f"{match.group(1)}: already in the config (drop the '+' to change it)"
    return " ".join(lines)


def check_overrides(argv: list[str], config_name: str) -> None:
    """Exit 2 with one line when an override names an unknown group option or a key the config does not have."""
    try:
        overrides = _parse(argv)
    except BaseException:  # noqa: BLE001 - argparse exits on --help etc.; Hydra will handle it
        return
    if overrides is None:
        return
    for override in overrides:
        message = group_choice_error(override)
        if message:
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
    single = [_as_single_run(o) for o in overrides]
    if any(s is None for s in single):
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        with contextlib.redirect_stderr(io.StringIO()), initialize_config_dir(config_dir=CONF_DIR,
                                                                              version_base="1.3"):
            compose(config_name=config_name, overrides=single)
    except Exception as error:  # noqa: BLE001 - every composition failure becomes one line
        print(f"error: {composition_error(error)}", file=sys.stderr)
        sys.exit(2)
    finally:
        GlobalHydra.instance().clear()
