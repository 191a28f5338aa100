"""Every option and config file of `xyserve serve` is validated before the model loads: a bad one
is one line on stderr naming the flag, the file and the field, and exit status 2 (argparse's).
Chip files are read with YAML's safe loader: a tag that would build a Python object is an error,
never run.
"""

from __future__ import annotations

import pathlib
import subprocess
import time

import pytest

from server.cli import main
from tests.server.harness import TINY_ENGINE_ARGS, xyserve_command

BAD_CHIP_FILES = {  # file name -> (content, what the one line must say)
    "indented.yaml": ("base: 910b2\nhbm_bytes_per_s: 1.2e12\n  cube_m: 16\n",
                      "not valid YAML: line 3, column 9"),
    "type.yaml": ("cube_m: '16'\n", "cube_m: must be an integer"),
    "negative.yaml": ("hbm_bytes_per_s: -1\n", "hbm_bytes_per_s: must be positive"),
    "unknown.yaml": ("cube_mm: 16\n", "cube_mm: not a ChipSpec field"),
    "base.json": ('{"base": "910b9"}', "base: unknown NPU '910b9'"),
    "list.json": ("[1, 2]", "a chip file is a mapping"),
    "broken.json": ('{"cube_m": 16', "not valid JSON"),
    "tab.yml": ("base:\t910b2\n\tcube_m: 16\n", "not valid YAML: line"),
}


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(["serve", *argv])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(BAD_CHIP_FILES))
def test_a_bad_chip_file_is_one_line_naming_file_and_field(
        name: str, tmp_path: pathlib.Path, tiny_llama_dir: pathlib.Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    content, expected = BAD_CHIP_FILES[name]
    path = tmp_path / name
    path.write_text(content)
    status, err = run_main(["--model", str(tiny_llama_dir), "--npu", str(path)], capsys)
    assert status == 2, err
    assert err.startswith(f"xyserve serve: error: --npu: {path}: ") and expected in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_chip_files_are_loaded_safely(tmp_path: pathlib.Path, tiny_llama_dir: pathlib.Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f'!!python/object/apply:os.system ["touch {marker}"]\n')
    status, err = run_main(["--model", str(tiny_llama_dir), "--npu", str(path)], capsys)
    assert status == 2 and "could not determine a constructor" in err
    assert err.count("\n") == 1
    assert not marker.exists()
    good = tmp_path / "good.yaml"  # and a valid file passes
    good.write_text("base: 910b4\nhbm_bytes_per_s: 1.0e12\n")
    from engine.cli_args import check_files
    from engine.config import EngineConfig
    check_files(EngineConfig(npu=str(good)))


@pytest.mark.parametrize(("argv", "expected"), [
    (["--npu", "no-such-chip"], "--npu: unknown NPU 'no-such-chip'"),
    (["--npu-trace", "/proc/version/traces"], "--npu-trace: cannot create /proc/version/traces"),
    (["--api-key", "   "], "api_key must not be empty"),
    (["--api-key", " key "], "start or end with whitespace"),
    (["--header-timeout", "0"], "header_timeout_s must be positive"),
    (["--body-timeout", "nan"], "body_timeout_s must be positive"),
    (["--max-connections", "0"], "max_connections must be at least 1"),
    (["--max-choices-per-request", "0"], "max_choices_per_request must be at least 1"),
    (["--mixed-prefill-budget", "0"], "mixed_prefill_budget must be at least 1"),
])
def test_bad_options_are_one_line_and_exit_2(argv: list[str], expected: str,
                                             tiny_llama_dir: pathlib.Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    status, err = run_main(["--model", str(tiny_llama_dir), *argv], capsys)
    assert status == 2, err
    assert err.startswith("xyserve serve: error: ") and expected in err, err
    assert err.count("\n") == 1
    if "--api-key" in argv:
        assert "key" not in err.replace("api_key", "")  # the secret is not echoed


def test_the_real_command_fails_before_loading_the_model(tmp_path: pathlib.Path,
                                                         tiny_llama_dir: pathlib.Path) -> None:
    path = tmp_path / "chip.yaml"
    path.write_text("base: 910b2\ncube_m: [16\n")
    start = time.monotonic()
    result = subprocess.run([*xyserve_command(), "serve", "--model", str(tiny_llama_dir),
                             "--npu", str(path), *TINY_ENGINE_ARGS],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"xyserve serve: error: --npu: {path}: "), lines
    assert "engine ready" not in result.stderr
    assert time.monotonic() - start < 30.0
