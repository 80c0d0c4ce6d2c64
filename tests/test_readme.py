"""Every command the README shows must still parse (no flag or subcommand may rot), every
config it names must load, and the two set-up commands must exist in the Makefile."""

import re
import shlex
from pathlib import Path

import pytest

from hwnas.cli import build_parser
from hwnas.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands(prog: str) -> list[list[str]]:
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(prog + " "):
                out.append(shlex.split(line)[1:])
    return out


@pytest.mark.parametrize("argv", _commands("hwnas"), ids=lambda a: " ".join(a[:3]))
def test_hwnas_commands_parse(argv):
    args = build_parser().parse_args(argv)
    cfg = getattr(args, "config", None)
    if cfg:
        assert (ROOT / cfg).exists(), cfg
        load_config(ROOT / cfg)


@pytest.mark.parametrize("argv", _commands("hwnas-edge"), ids=lambda a: " ".join(a[:2]))
def test_edge_commands_parse(argv):
    from hwnas_edge.cli import build_parser as edge_parser

    edge_parser().parse_args(argv)


def test_make_targets_and_configs():
    mk = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", mk, re.M) and re.search(r"^test:", mk, re.M)
    assert "make demo" in README and "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    for name in ("quickstart", "omniglot", "gpu-large", "own-data"):
        load_config(ROOT / "configs" / f"{name}.yaml")
