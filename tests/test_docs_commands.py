"""Every documented command runs as written.

Every ``lorkd-pl`` line in a fenced shell block of the README and docs/ is parsed by lorkd-pl's own
parser (Lightning commands by LightningCLI with ``--print_config``: options, packaged config names and
value types). The README's quick tour runs for real, in order, in an empty folder: each command's paths
are the ones the command before it wrote (``runs/demo/<recipe>/latest/...``), with a short budget
appended to fits and tests and the placeholders ``scan.nii.gz``/``scans/`` made from demo volumes.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from lorkd_pl.app.cli import build_parser, main, split_tasks_dirs
from lorkd_pl.app.commands import LIGHTNING_COMMANDS, TEACHER_COMMANDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Shell blocks' fence languages (a bare fence is a shell block too when its lines are commands).
SHELL = {"", "bash", "sh", "shell", "console"}


def documented_commands(path: Path) -> list[tuple[int, list[str]]]:
    """``(line number, argv)`` of every ``lorkd-pl`` command in ``path``'s fenced shell blocks
    (continuation lines joined, comments dropped, ``$VAR``/``"$VAR"`` expanded from the block's own
    ``VAR=...`` assignments)."""
    commands, block, start, language, variables = [], None, 0, "", {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if block is None:
                block, start, language, variables = [], number, stripped[3:].strip(), {}
                continue
            if language in SHELL:
                commands += _commands(block, start, variables)
            block = None
            continue
        if block is not None:
            block.append(line)
    return commands


def _commands(block: list[str], start: int, variables: dict[str, str]) -> list[tuple[int, list[str]]]:
    found, text, first = [], "", 0
    for offset, line in enumerate(block, 1):
        if not text:
            first = start + offset
        text += line[:-1] + " " if line.rstrip().endswith("\\") else line
        if line.rstrip().endswith("\\"):
            continue
        line, text = text.strip(), ""
        if re.match(r"[A-Z_]+=", line):  # VAR=... of the block, used by its commands
            name, _, value = shlex.split(line, comments=True)[0].partition("=")
            variables[name] = value
            continue
        if line.startswith("lorkd-pl "):  # output and prose lines of a block are not parsed
            for name, value in variables.items():  # "$VAR": one word; $VAR: split, as the shell does
                line = line.replace(f'"${name}"', shlex.quote(value)).replace(f"${name}", value)
            found.append((first, shlex.split(line, comments=True)[1:]))
    return found


def documented_files(path: Path) -> dict[str, str]:
    """The config files ``path`` shows whole: YAML blocks whose first line is ``# <name>.yaml``."""
    files, block, language = {}, None, ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip().startswith("```"):
            if block is not None:
                block.append(line)
            continue
        if block is None:
            block, language = [], line.strip()[3:].strip()
            continue
        if language == "yaml" and block and re.fullmatch(r"# [\w.-]+\.yaml", block[0].strip()):
            files[block[0].strip()[2:]] = "\n".join(block) + "\n"
        block = None
    return files


COMMANDS = [(f"{path.name}:{line}", args) for path in DOCS for line, args in documented_commands(path)]
FILES = {name: text for path in DOCS for name, text in documented_files(path).items()}


def test_the_docs_hold_the_commands_a_user_reads_first() -> None:
    names = {args[0] for _, args in COMMANDS if args}
    assert {"fit", "test", "export", "predict", "report", "runs", "demo", "tasks"} <= names
    assert len(COMMANDS) >= 40
    assert "brain_lorkd.yaml" in FILES


@pytest.mark.parametrize(("where", "args"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_every_documented_command_parses(where, args, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    for name, text in FILES.items():  # the configs the docs show whole (brain_lorkd.yaml)
        (tmp_path / name).write_text(text)
    rest, _ = split_tasks_dirs(args)
    if rest[0] in LIGHTNING_COMMANDS:
        from lorkd_pl.app.configs import resolve_config_args
        from lorkd_pl.app.lightning import lightning_cli

        with pytest.raises(SystemExit) as exit_info:  # parse, print the resolved config, stop
            lightning_cli(resolve_config_args([*rest, "--print_config"]), run=True)
        assert exit_info.value.code == 0, capsys.readouterr().err
        return
    if rest[0] in TEACHER_COMMANDS:
        assert "--config" in rest, where
        return
    options = build_parser().parse_args(rest)  # exits 2 on an option the command does not have
    assert options.command == rest[0]


BUDGET = {
    "fit": [
        "--trainer.max_epochs=1",
        "--data.init_args.samples_per_epoch=4",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ],
    "test": ["--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false"],
}
#: A router trained for 4 samples is rightly unsure (--region auto would stop and ask): accepted here.
UNSURE_ROUTER = ["--min-confidence=0"]


def test_the_readme_quick_tour_runs_in_order(tmp_path, monkeypatch) -> None:
    """Each command reads what the one before wrote (the run folders' ``latest``), as documented."""
    from lorkd_pl.registry import get_task

    monkeypatch.chdir(tmp_path)
    images = [Path(record["image"]) for record in get_task("demo_brain_seg").records("test")]
    shutil.copy(images[0], tmp_path / "scan.nii.gz")
    (tmp_path / "scans").mkdir()
    for image in images[:2]:
        shutil.copy(image, tmp_path / "scans" / image.name)
    tour = [args for where, args in COMMANDS if where.startswith("README.md")]
    assert [args[0] for args in tour[:4]] == ["fit", "fit", "test", "export"]
    for args in tour:
        extra = UNSURE_ROUTER if "auto" in args else BUDGET.get(args[0], [])
        assert main([*args, *extra]) == 0, args
    assert (tmp_path / "runs/demo/lorkd_seg/latest/test_last/summary").is_dir()
    assert sorted(p.name for p in (tmp_path / "predictions").glob("*.nii.gz"))
    assert (tmp_path / "bundle" / "configs" / "inference.json").is_file()
