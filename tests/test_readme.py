"""Every command the README shows must still parse (no flag or subcommand may rot), must be
run by a named test (with the same subcommand and flags, on a small config), every config it
names must load, and the two set-up commands must exist in the Makefile."""

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


# Each README command -> the test that runs it: the same subcommand with the same flags (the
# values may differ: a small config, a temporary folder). A command added to the README
# without a test that runs it fails below.
RUN_BY = {
    "hwnas data --dataset omniglot --protocol open --run-dir runs/omni": "test_cli.py::test_data_command_writes_splits",
    "hwnas space --config configs/quickstart.yaml --sample 3": "test_cli.py::test_space_command",
    "hwnas profile --device cpu --config configs/quickstart.yaml --validate 100":
        "test_latency.py::test_profile_cli_uses_the_configs_thread_count",
    "hwnas profile --device cpu --config configs/quickstart.yaml --compare-threads":
        "test_latency.py::test_profile_cli_uses_the_configs_thread_count",
    "hwnas train-gallery --config configs/quickstart.yaml": "test_compat.py::trained_gallery",
    "hwnas train-supernet --config configs/quickstart.yaml --resume": "test_compat.py::test_kill_and_resume",
    "hwnas search --config configs/quickstart.yaml --budget-ms 0.2 --reward r3 --alpha 0.5":
        "test_search.py::test_outputs_and_from_search",
    "hwnas train-query --config configs/quickstart.yaml --from-search": "test_search.py::test_outputs_and_from_search",
    "hwnas train-query --config configs/quickstart.yaml --timm mobilenetv3_small_050":
        "test_compat.py::test_timm_baseline_query",
    "hwnas evaluate --config configs/quickstart.yaml --query runs/quickstart/query/searched":
        "test_compat.py::test_evaluate_cli_json",
    "hwnas evaluate --config configs/quickstart.yaml --query runs/quickstart/query/searched --far 1e-3":
        "test_compat.py::test_evaluate_cli_json",
    "hwnas adapt --config configs/omniglot.yaml --epochs 15": "test_compat.py::test_torchrun_train_query_and_adapt",
    "hwnas deploy --config configs/quickstart.yaml --int8 --overwrite":
        "test_deploy.py::test_a_catalog_is_indexed_in_place_of_the_test_gallery",
    "hwnas verify runs/quickstart/bundle": "test_deploy.py::test_verify_and_tamper",
    "hwnas run configs/omniglot.yaml --jobs 1": "test_cli.py::test_run_pipeline_end_to_end_and_resume",
    "hwnas run configs/quickstart.yaml --from train-query": "test_cli.py::test_run_pipeline_end_to_end_and_resume",
    "hwnas deploy --config configs/quickstart.yaml --catalog ~/shop/photos --out /srv/bundle":
        "test_deploy.py::test_a_catalog_is_indexed_in_place_of_the_test_gallery",
    "hwnas data --config configs/own-data.yaml --data-dir ~/photos": "test_cli.py::test_unreadable_images_stop_a_run_at_its_data_step_naming_them_all",
    # (runs `run --set data.data_dir=...` to its data step, which the override reaches; the
    # pipeline end to end runs without --set in test_run_pipeline_end_to_end_and_resume)
    "hwnas run configs/own-data.yaml --set data.data_dir=~/photos": "test_cli.py::test_bad_input_exits_nonzero_with_clear_message",
    "hwnas data --dataset folder --data-dir ~/photos --protocol open --run-dir runs/mine":
        "test_cli.py::test_data_command_writes_splits",
    "hwnas data --dataset manifest --data-dir images.csv --run-dir runs/mine2": "test_cli.py::test_data_command_writes_splits",
    "hwnas-edge query runs/quickstart/bundle photo.png --top-k 5": "test_deploy.py::test_edge_runtime_without_torch_matches_pytorch",
    "hwnas-edge query runs/quickstart/bundle photo.png --threads 2": "test_deploy.py::test_edge_add_grows_the_index_without_torch",
    "hwnas-edge query runs/quickstart/bundle photos/ --json": "test_deploy.py::test_edge_runtime_without_torch_matches_pytorch",
    "hwnas-edge serve runs/quickstart/bundle --port 8000": "test_deploy.py::_start_service",  # (the service fixture)
    "hwnas-edge query runs/quickstart/bundle photo.png --server http://127.0.0.1:8000":
        "test_deploy.py::test_service_answers_and_refuses",
    "hwnas-edge verify runs/quickstart/bundle": "test_deploy.py::test_edge_add_grows_the_index_without_torch",
    "hwnas-edge add runs/quickstart/bundle new_photos/ --label new":
        "test_deploy.py::test_edge_add_grows_the_index_without_torch",
}


def _test_source(ref: str) -> str:
    """The source of the test function ``file.py::name`` (its body up to the next top-level def)."""
    file, name = ref.split("::")
    text = (ROOT / "tests" / file).read_text()
    m = re.search(rf"^def {re.escape(name)}\(.*?(?=^def |^@|\Z)", text, re.S | re.M)
    assert m, f"{ref}: no such test"
    return m.group(0)


def test_every_readme_command_is_run_by_a_test():
    shown = {" ".join([prog, *argv]) for prog in ("hwnas", "hwnas-edge") for argv in _commands(prog)}
    missing = sorted(shown - set(RUN_BY))
    assert not missing, f"README commands no test runs (add one and name it in RUN_BY): {missing}"
    for cmd in sorted(shown):
        src = _test_source(RUN_BY[cmd])
        words = shlex.split(cmd)
        sub = words[1]
        flags = [w for w in words if w.startswith("--")]
        for token in [sub, *flags]:
            assert f'"{token}"' in src, f"{RUN_BY[cmd]} does not run {token!r} of: {cmd}"


def test_every_flag_and_step_is_in_the_readme():
    """The README's CLI reference names every flag of every subcommand (hwnas and hwnas-edge)
    and every step `run --from` takes: a new one that is not documented fails here."""
    import argparse

    from hwnas.pipeline import STEPS
    from hwnas_edge.cli import build_parser as edge_parser

    missing = []
    for prog, parser in (("hwnas", build_parser()), ("hwnas-edge", edge_parser())):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for name, sp in sub.choices.items():
            for action in sp._actions:
                for flag in action.option_strings:
                    if flag.startswith("--") and flag != "--help" and not re.search(re.escape(flag) + r"(?![\w-])", README):
                        missing.append(f"{prog} {name} {flag}")
    assert not missing, f"flags the README does not name: {missing}"
    from_line = README[README.index("`run --from STEP` takes"):][:400]
    assert all(f"`{step}`" in from_line for step in STEPS), from_line
