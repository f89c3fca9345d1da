"""``smooth-infonce-solo``: register everything, then run a solo-learn clone's own
main_pretrain.py / main_linear.py with a shipped config and Hydra overrides.

    smooth-infonce-solo pretrain --config-name light_moco [--solo-path CLONE] [hydra overrides]
    smooth-infonce-solo linear --config-name linear --checkpoint CKPT [overrides]
    smooth-infonce-solo configs          # list the shipped configs and group options
    smooth-infonce-solo configs --write  # regenerate the presets' configs (--check: compare only)

Also ``python -m smooth_infonce.integrations.solo ...``. The clone is ``--solo-path``, else
``$SOLO_LEARN_PATH``, else the parent folder of the importable ``solo`` package (an editable
install of a clone). Everything after the launcher's own options goes to Hydra unchanged
(``key=value`` overrides, ``--config-dir`` for your own configs next to the shipped groups,
``--cfg job`` to print the composed config).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from .configs_index import CONFIG_PATH, list_configs, list_group_options
from .registry import SOLO_INSTALL_HINT, SoloLearnNotFound, register

SCRIPTS = {"pretrain": "main_pretrain.py", "linear": "main_linear.py"}
SOLO_PATH_ENV = "SOLO_LEARN_PATH"


def find_solo_clone(solo_path: Optional[str], script: str) -> Path:
    """The clone folder holding ``script``: ``solo_path``, $SOLO_LEARN_PATH, or the importable
    ``solo`` package's parent. Raises SoloLearnNotFound with the install recipe otherwise."""
    tried = []
    candidates = []
    if solo_path:
        candidates.append(("--solo-path", Path(solo_path)))
    elif os.environ.get(SOLO_PATH_ENV):
        candidates.append((f"${SOLO_PATH_ENV}", Path(os.environ[SOLO_PATH_ENV])))
    else:
        try:
            import solo
        except ImportError:
            solo = None
        if solo is not None and getattr(solo, "__file__", None):
            candidates.append(("the installed solo package", Path(solo.__file__).resolve().parent.parent))
    for origin, folder in candidates:
        folder = folder.expanduser().resolve()
        if (folder / script).is_file():
            return folder
        tried.append(f"{origin}: {folder} has no {script}")
    detail = "; ".join(tried) if tried else f"no --solo-path, no ${SOLO_PATH_ENV} and no importable solo package"
    raise SoloLearnNotFound(
        f"cannot find solo-learn's {script} ({detail}). A pip-installed solo-learn does not ship its "
        f"scripts: pass the clone with --solo-path or ${SOLO_PATH_ENV}.\n\n{SOLO_INSTALL_HINT}"
    )


def resolve_config_name(kind: str, name: str) -> str:
    """``light_moco`` -> ``pretrain/light_moco`` when shipped; any other name is left to Hydra
    (a config of your own under ``--config-dir``)."""
    if "/" not in name and f"{kind}/{name}" in list_configs(kind):
        return f"{kind}/{name}"
    return name


def hydra_argv(kind: str, config_name: str, hydra_args: Sequence[str], script: Path) -> List[str]:
    args = list(hydra_args)
    own_path = any(a == "--config-path" or a.startswith("--config-path=") or a == "-cp" for a in args)
    prefix = [] if own_path else ["--config-path", CONFIG_PATH]
    return [str(script), *prefix, "--config-name", resolve_config_name(kind, config_name), *args]


def hydra_quote(value: str) -> str:
    """A Hydra override value as a quoted string: solo-learn's checkpoint names contain "="
    (``...-ep=99.ckpt``), which Hydra's override grammar rejects unquoted."""
    quote = "'" if "'" not in value else '"'
    if quote in value:
        raise ValueError(f"cannot quote {value!r} for Hydra: it contains both quote characters")
    if value.endswith("\\"):
        value += "\\"  # a trailing backslash would escape the closing quote
    return f"{quote}{value}{quote}"


def run_solo_script(kind: str, config_name: str, hydra_args: Sequence[str], solo_path: Optional[str] = None) -> None:
    """Register the methods and backbones, then execute the clone's script as ``__main__``
    (in this process, so the registration is visible to it). The script imports the installed
    ``solo`` package; only when none is installed is the clone itself put on ``sys.path``."""
    clone = find_solo_clone(solo_path, SCRIPTS[kind])
    try:
        import solo  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(clone))  # a clone that was not pip-installed: import it in place
    register()
    script = clone / SCRIPTS[kind]
    saved_argv = sys.argv
    sys.argv = hydra_argv(kind, config_name, hydra_args, script)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved_argv


def print_configs() -> None:
    for kind in SCRIPTS:
        print(f"{kind} configs (--config-name):")
        for name in list_configs(kind):
            print(f"  {name.split('/', 1)[1]}")
    print("config groups (override as group=option):")
    for group, options in list_group_options().items():
        print(f"  {group}: {', '.join(options)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smooth-infonce-solo", allow_abbrev=False,
        description="Run solo-learn's main_pretrain.py / main_linear.py with smooth-infonce's methods, "
                    "backbones and shipped configs. Extra arguments go to Hydra.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for kind in SCRIPTS:
        command = commands.add_parser(kind, help=f"run solo-learn's {SCRIPTS[kind]}", allow_abbrev=False)
        command.add_argument("--config-name", "-cn", required=True,
                             help=f"a shipped {kind} config (see `configs`) or one of yours under --config-dir")
        command.add_argument("--solo-path", default=None,
                             help=f"solo-learn clone (default: ${SOLO_PATH_ENV}, else the installed solo's parent)")
        if kind == "linear":
            command.add_argument("--checkpoint", default=None,
                                 help="pretrained checkpoint; same as a quoted "
                                      "pretrained_feature_extractor=... override")
    configs = commands.add_parser("configs", help="list the shipped configs and config-group options")
    action = configs.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true",
                        help="regenerate the presets' pretrain configs and augmentation groups from the presets")
    action.add_argument("--check", action="store_true",
                        help="exit 1 if a shipped preset config differs from what the presets generate")
    return parser


# Hydra's own command-line flags, passed through to solo-learn's script with the overrides
HYDRA_FLAGS = ("--cfg", "-c", "--resolve", "--package", "-p", "--info", "-i", "--run", "-r", "--multirun", "-m",
               "--config-dir", "-cd", "--config-path", "-cp", "--hydra-help", "--shell-completion",
               "--experimental-rerun")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        parser.error(f"unrecognized argument {argv[0]}: a command comes first ({', '.join(SCRIPTS)} or configs)")
    args, hydra_args = parser.parse_known_args(argv)
    unknown = [a for a in hydra_args if a.startswith("-") and a.split("=", 1)[0] not in HYDRA_FLAGS]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (Hydra overrides are key=value; flags: see "
                     f"--help)")
    if args.command == "configs":
        if hydra_args:
            parser.error(f"unexpected arguments: {hydra_args}")
        if args.write or args.check:
            from .generate import run

            return run(write_files=args.write)
        print_configs()
        return 0
    if getattr(args, "checkpoint", None):
        hydra_args = [*hydra_args, f"pretrained_feature_extractor={hydra_quote(args.checkpoint)}"]
    try:
        run_solo_script(args.command, args.config_name, hydra_args, args.solo_path)
    except SoloLearnNotFound as err:
        print(f"smooth-infonce-solo: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
