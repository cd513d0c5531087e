"""The README and the docs pages stay true to the code: every ```bash block of README.md and docs/*.md
is parsed, and each command in it is checked against what exists, without training anything.

- `python -m lyra.X ...` names an existing module. For a Hydra app (a `lyra/conf/X.yaml` exists) its
  overrides compose with `lyra.paths.compose_config`, as the CLI would: an unknown key or group option
  fails here (`--config-dir` joins the search path, a sweep composes its first value). For an argparse
  app, its subcommand and every `--flag` are options it defines.
- `python scripts/X.py --flag` and `bash scripts/X.sh`: the script exists and knows the flag.
- `pip install -e '.[extra]'`: pyproject.toml defines the extra; a pinned `pip install NAME==V` is the
  pin scripts/setup.sh or constraints.txt holds.
- Repo paths named in commands exist; relative links in README.md and docs/*.md point at files.
- `--cfg` commands (print the composed config) are run for real: they are offline and fast.
Also: the README is at most 20 KB and keeps the quick-start commands CI runs.

    python -m pytest -q tests/test_docs.py
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
REPO_DIRS = ("lyra/", "scripts/", "examples/", "docs/", "notebooks/", "tests/")
SEPARATORS = {"&&", "||", ";", "|", "&"}
QUICK_START = (
    "python3 -m venv .venv && . .venv/bin/activate && bash scripts/setup.sh && bash scripts/train_default.sh",
    "python3 -m venv .venv && . .venv/bin/activate && bash scripts/setup.sh && python -m pytest",
)


@dataclass
class Command:
    page: str
    line: int
    cwd: Path  # where the command runs, after any `cd` earlier in its block
    argv: list[str]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {shlex.join(self.argv)}"


def bash_blocks(path: Path) -> list[tuple[int, str]]:
    """(first line number, text) of every ```bash block of a markdown file."""
    blocks, start, lines = [], None, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if start is None and line.strip() == "```bash":
            start, lines = number + 1, []
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(lines)))
            start = None
        elif start is not None:
            lines.append(line)
    assert start is None, f"{path}: unclosed ```bash block from line {start}"
    return blocks


def split_words(text: str) -> list[str]:
    """Shell words of one logical line: quotes removed, comments dropped, `&&`/`|`/`;` as their own words."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True  # non-ASCII words (prompt=你好) stay one word
    return list(lexer)


def commands_of(path: Path) -> list[Command]:
    """Every simple command of every ```bash block, with the directory it runs in."""
    commands = []
    for start, text in bash_blocks(path):
        cwd = REPO_ROOT
        logical, first = "", None
        for offset, line in enumerate(text.split("\n")):
            first = start + offset if first is None else first
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            words, logical = split_words(logical + line), ""
            argv: list[str] = []
            for word in [*words, ";"]:
                if word not in SEPARATORS:
                    argv.append(word)
                    continue
                if argv and argv[0] == "cd":
                    cwd = (cwd / argv[1]).resolve()
                    assert cwd.is_dir(), f"{path.name}:{first}: cd {argv[1]}: no such directory"
                elif argv:
                    commands.append(Command(str(path.relative_to(REPO_ROOT)), first, cwd, argv))
                argv = []
            first = None
    return commands


ALL_COMMANDS = [command for page in PAGES for command in commands_of(page)]


def lyra_module(command: Command) -> tuple[str, list[str]] | None:
    """('lyra.X', its arguments) when the command runs `-m lyra.X` (python, python3, accelerate launch)."""
    argv = command.argv
    if Path(argv[0]).name not in ("python", "python3", "accelerate") or "-m" not in argv:
        return None
    index = argv.index("-m")
    if not argv[index + 1].startswith("lyra"):
        return None
    return argv[index + 1], argv[index + 2:]


def module_file(module: str) -> Path | None:
    path = REPO_ROOT / Path(*module.split("."))
    for candidate in (path / "__main__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def hydra_overrides(args: list[str], cwd: Path) -> tuple[list[str], bool]:
    """The overrides `args` give a Hydra app, and whether it needs the `hydra` node (hydra.* keys,
    sweeps, launchers). Sweeps keep their first value: each job of a multirun composes one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides, needs_hydra, skip = [], False, False
    for position, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if arg in ("-m", "--multirun"):
            needs_hydra = True
        elif arg in ("--cfg", "-c", "--package", "-p"):
            skip = True  # --cfg job: only what is printed
        elif arg == "--config-dir":
            config_dir = (cwd / args[position + 1]).resolve()
            assert config_dir.is_dir(), f"--config-dir {args[position + 1]}: no such directory"
            overrides.append(f"hydra.searchpath=[file://{config_dir}]")
            needs_hydra, skip = True, True
        else:
            assert not arg.startswith("-"), f"unknown Hydra flag {arg}"
            overrides.append(arg)
    parsed = OverridesParser.create().parse_overrides(overrides)
    first_values = []
    for text, override in zip(overrides, parsed):
        needs_hydra |= override.get_key_element().startswith(("hydra", "+hydra")) or "hydra/" in text
        if override.is_sweep_override():
            value = next(iter(override.sweep_string_iterator()))
            first_values.append(f"{override.get_key_element()}={value}")
            needs_hydra = True
        else:
            first_values.append(text)
    return first_values, needs_hydra


def options_of(parser: argparse.ArgumentParser) -> tuple[set[str], dict[str, argparse.ArgumentParser]]:
    flags = {flag for action in parser._actions for flag in action.option_strings}
    subcommands = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            subcommands.update(action.choices)
    return flags, subcommands


def check_argparse_app(module: str, args: list[str]) -> None:
    """Subcommand and flags against the app's own parser, captured as it parses `--help`."""
    import importlib

    captured = []
    parse_args = argparse.ArgumentParser.parse_args

    def capture(self, *a, **k):
        captured.append(self)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        entry = importlib.import_module(module if module_file(module).name != "__main__.py" else f"{module}.__main__")
        with pytest.raises(SystemExit):
            entry.main(["--help"])
    finally:
        argparse.ArgumentParser.parse_args = parse_args
    assert captured, f"{module}.main never built an argparse parser"
    flags, subcommands = options_of(captured[0])
    if subcommands:
        assert args and args[0] in subcommands, f"{module}: no subcommand {args[:1]} (has {sorted(subcommands)})"
        flags |= options_of(subcommands[args[0]])[0]
    for arg in args:
        if arg.startswith("--"):
            assert arg.split("=")[0] in flags, f"{module} has no option {arg} (has {sorted(flags)})"


def test_every_docs_page_has_commands_and_the_parser_reads_them():
    assert len(ALL_COMMANDS) > 40
    pages = {command.page for command in ALL_COMMANDS}
    assert {"README.md", "docs/data.md", "docs/sweeps.md", "docs/performance.md"} <= pages
    assert any(command.argv[-1] == "prompt=你好" for command in ALL_COMMANDS)  # quotes and non-ASCII
    assert any("hydra.launcher.setup=" in arg for command in ALL_COMMANDS for arg in command.argv)  # continuations


@pytest.mark.parametrize("command", [c for c in ALL_COMMANDS if lyra_module(c)], ids=str)
def test_lyra_commands_name_real_modules_and_keys(command):
    from omegaconf import OmegaConf

    from lyra.paths import CONF_DIR, compose_config

    module, args = lyra_module(command)
    assert module_file(module), f"{command}: no module {module}"
    app = module.split(".")[-1]
    if (CONF_DIR / f"{app}.yaml").is_file():
        if "quote_text_overrides(sys.argv)" in module_file(module).read_text(encoding="utf-8"):
            import importlib  # the app quotes free text (prompt=你好，主人！) before Hydra parses it

            args = importlib.import_module(module).quote_text_overrides(args)
        overrides, needs_hydra = hydra_overrides(args, command.cwd)
        config = compose_config(app, overrides, return_hydra_config=needs_hydra)  # unknown key: raises
        assert OmegaConf.select(config, "run_dir" if app != "train" else "lora") is not None
    else:
        check_argparse_app(module, args)


@pytest.mark.parametrize("command", [c for c in ALL_COMMANDS if not lyra_module(c)], ids=str)
def test_scripts_extras_pins_and_paths_exist(command):
    argv = command.argv
    program = Path(argv[0]).name
    if program in ("bash", "python", "python3") and len(argv) > 1 and argv[1].startswith("scripts/"):
        script = REPO_ROOT / argv[1]
        assert script.is_file(), f"{command}: no {argv[1]}"
        source = script.read_text(encoding="utf-8")
        for flag in argv[2:]:
            if flag.startswith("--"):
                assert f'"{flag.split("=")[0]}"' in source, f"{command}: {argv[1]} has no option {flag}"
    if "pip" in argv and "install" in argv:
        extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        pins = (REPO_ROOT / "scripts/setup.sh").read_text() + (REPO_ROOT / "constraints.txt").read_text()
        for arg in argv[argv.index("install") + 1:]:
            for extra in re.findall(r"^\.\[(.+)\]$", arg):
                assert set(extra.split(",")) <= set(extras), f"{command}: pyproject.toml has no extra {extra}"
            if "==" in arg:
                assert arg in pins, f"{command}: {arg} is not the pin of scripts/setup.sh or constraints.txt"
    for arg in argv[1:]:
        value = arg.split("=", 1)[-1]
        if value.startswith(REPO_DIRS) and not re.search(r"[*?<>\[\]]", value):
            assert (REPO_ROOT / value).exists(), f"{command}: {value} does not exist"


@pytest.mark.parametrize("command", [c for c in ALL_COMMANDS if "--cfg" in c.argv], ids=str)
def test_print_config_commands_run(command):
    result = subprocess.run([sys.executable, *command.argv[1:]], cwd=command.cwd, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lora:" in result.stdout and "persona:" in result.stdout


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_point_at_files(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (page.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{page.name}: links to missing files: {missing}"


def test_readme_is_short_and_keeps_the_quick_start_ci_runs():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) <= 20 * 1024
    for line in QUICK_START:
        assert line in readme.splitlines(), line
    ci = (REPO_ROOT / ".ci/run").read_text(encoding="utf-8")
    # CI runs the setup and test halves of the second command, and builds the docs site strictly.
    assert "bash scripts/setup.sh" in ci and "\npython -m pytest" in ci
    assert "mkdocs build --strict" in ci


def test_the_mkdocs_nav_holds_every_docs_page():
    import yaml

    config = yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    in_nav = {page for entry in config["nav"] for page in entry.values()}
    on_disk = {page.name for page in (REPO_ROOT / "docs").glob("*.md")}
    assert in_nav == on_disk, f"not in the nav: {sorted(on_disk - in_nav)}; no such page: {sorted(in_nav - on_disk)}"
    assert {"index.md", "configuration.md", "data.md", "chat-and-export.md", "evaluation.md", "sweeps.md",
            "performance.md", "reliability.md", "real-weights.md", "gpu.md"} <= in_nav
