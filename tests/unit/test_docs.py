"""The documentation's commands and links: every `python tools/...`, `deepspeed ... launchers/pretrain.py` or
`bash launchers/...` command shown in README.md and docs/ names a script that exists and whose parser accepts the
arguments shown (placeholders such as `<name>` or `...` excepted), every shipped config it names loads with its
overrides, and every relative link resolves."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from tests.helpers import ROOT, load_script

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPT = re.compile(r"((?:tools|launchers)/[\w/]+\.(?:py|sh))")


def commands() -> list[tuple[str, str]]:
    """(document, command) for each command in a bash block or an inline code span."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            found += [(doc.name, line) for line in block.replace("\\\n", " ").splitlines()]
        found += [(doc.name, span) for span in re.findall(r"`([^`\n]*(?:\n[^`\n]*)?)`", text)
                  if re.match(r"(python|deepspeed|bash) ", span)]
    return [(doc, " ".join(cmd.split("#", 1)[0].split())) for doc, cmd in found if SCRIPT.search(cmd)]


class Parsed(Exception):
    """Raised in place of running an entry point once its arguments parsed."""


def _parses(script: str, argv: list[str], monkeypatch) -> str | None:
    """None when `script`'s parser accepts `argv`, else why not."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        load_script(script).main(argv)
    except Parsed:
        return None
    except SystemExit as exit_:
        return f"exit {exit_.code}"
    finally:
        monkeypatch.undo()
    return "main() returned without parsing"


CHECKED = [(doc, cmd) for doc, cmd in commands() if not re.search(r"<|\.\.\.|…|\[|\$|&&", cmd)]


def test_the_docs_show_commands_to_check():
    assert len(CHECKED) >= 10, CHECKED


@pytest.mark.parametrize(("doc", "command"), CHECKED, ids=[f"{d}:{c[:60]}" for d, c in CHECKED])
def test_a_documented_command_parses(doc, command, monkeypatch):
    from megamoe import config

    words = shlex.split(command)
    script = next(w for w in words if SCRIPT.fullmatch(w))
    assert (ROOT / script).is_file(), f"{doc}: {script} does not exist"
    if not script.endswith(".py"):
        return
    argv = words[words.index(script) + 1:]
    assert (why := _parses(script, argv, monkeypatch)) is None, f"{doc}: `{command}`: {why}"
    if "--config" in argv and (ROOT / (path := argv[argv.index("--config") + 1])).is_file():
        config.load(ROOT / path, [a for a in argv if re.fullmatch(r"[a-z_]+\.[\w.]+=.*", a)])


def test_every_relative_link_resolves():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (doc.parent / target.split("#")[0]).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_check_catches_a_wrong_flag(monkeypatch, capsys):
    """Not vacuous: an argument the parser does not know fails it."""
    assert _parses("tools/plan.py", ["--config", "configs/tiny-dense.yaml", "--no-such-flag"], monkeypatch) == "exit 2"
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
