"""`--help` of the `trl-longreward` command, of every subcommand and of the recipe: exit 0 and list the options.

argparse %-formats every help string, so a bare `%` in a field's help crashes `--help` with a traceback.
The subcommands come from the package's command table, so a new command is covered without editing this file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trl_longreward.commands import COMMANDS, main

# Options each command's help must name; a command missing here is still checked for exit 0 and its usage line.
KEY_OPTIONS = {
    "score": ("--input", "--output", "--judge_base_url", "--judge_model"),
    "build-pairs": ("--model", "--input", "--output_dir", "--shard_index", "--num_shards", "--judge_base_url"),
    "evaluate": ("--model", "--output_dir", "--shard_index", "--num_shards", "--judge_base_url"),
    "merge-shards": ("--shards", "--output_dir", "--input"),
    "agreement": ("--input", "--output_dir", "--judge_model", "--judge_base_url"),
}


def _help(capsys, argv: list[str]) -> str:
    """Run `main(argv)` in this process; `--help` must end in exit status 0 (returned or raised)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    assert code in (0, None), f"exit {code}\n{err}"
    assert "Traceback" not in err
    return out


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_top_level_help_lists_every_command(capsys, flag):
    out = _help(capsys, [flag])
    assert out.startswith("usage: trl-longreward COMMAND")
    for command in COMMANDS:
        assert f"  {command} " in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_exits_0_and_names_its_options(capsys, command):
    out = _help(capsys, [command, "--help"])
    assert out.startswith(f"usage: trl-longreward {command}")
    assert "--help" in out
    for option in KEY_OPTIONS.get(command, ()):
        assert option in out, f"{command} --help does not name {option}"


@pytest.mark.parametrize("command", ["build-pairs", "evaluate"])
def test_percent_in_help_text_is_shown_literally(capsys, command):
    out = " ".join(_help(capsys, [command, "--help"]).split())  # argparse wraps lines
    assert "g % N == I" in out and "%%" not in out


def test_recipe_help_exits_0_and_names_its_options(recipe, capsys):
    with pytest.raises(SystemExit) as exit_:
        recipe.parse_arguments(["--help"])
    out, err = capsys.readouterr()
    assert exit_.value.code in (0, None), err
    for option in ("--model_name_or_path", "--dataset_name", "--long_reward", "--output_dir"):
        assert option in out


def test_installed_console_script_help():
    script = Path(sys.executable).with_name("trl-longreward")
    # `.ci/install` installs the package: a missing entry point is a broken install, not a reason to skip
    assert script.exists(), f"no console script next to {sys.executable}; install the package (pip install -e .)"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: trl-longreward COMMAND")
    assert all(command in done.stdout for command in COMMANDS)
