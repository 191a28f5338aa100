"""`xyserve --version`, `--config FILE` for serve and simulate, `--threads`, `--pin-threads`."""

from __future__ import annotations

import os
import pathlib

import pytest

from engine.config import EngineConfig
from server import __version__
from server.cli import build_configs, build_parser, main
from server.cli_config import ConfigFileError, expand_config


def _expand(argv: list[str]) -> list[str]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if hasattr(a, "choices") and a.choices
                      and "serve" in a.choices)
    return expand_config(subparsers, argv)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"xyserve {__version__}"


def test_serve_config_file_sets_options_and_the_command_line_wins(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("max-num-seqs: 8\nmax_model_len: 256\nport: 9001\nthreads: 2\n"
                      "log-format: json\nlog-metrics-scrapes: true\ncors-origins: [a, b]\n"
                      "enable-prefix-caching: false\n")
    argv = _expand(["serve", "--config", str(config), "--port", "9002"])
    server, engine = build_configs(build_parser().parse_args(argv))
    assert server.port == 9002  # the command line overrides the file
    assert (server.log_format, server.log_metrics_scrapes) == ("json", True)
    assert server.cors_origins == ("a", "b")
    assert (engine.scheduler.max_num_seqs, engine.scheduler.max_model_len) == (8, 256)
    assert engine.threads == 2 and not engine.cache.enable_prefix_caching


@pytest.mark.parametrize(("text", "message"), [
    ("no-such-option: 1\n", "'no-such-option' is not an option of `xyserve serve`"),
    ("log-metrics-scrapes: 3\n", "log-metrics-scrapes must be true or false, got 3"),
    ("- a list\n", "expected a mapping of option: value"),
    ("port: [\n", "while parsing"),
])
def test_bad_config_files_are_one_line_errors(tmp_path: pathlib.Path, text: str, message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigFileError, match=r"--config .*bad\.yaml"):
        _expand(["serve", "--config", str(config)])
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--config", str(config)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_config_values_get_the_command_lines_checks(tmp_path: pathlib.Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("log-format: xml\n")
    with pytest.raises(SystemExit):
        main(["serve", "--config", str(config)])
    assert "invalid choice: 'xml'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--config", str(tmp_path / "missing.yaml")])
    assert "No such file" in capsys.readouterr().err


def test_simulate_reads_a_config_file(tmp_path: pathlib.Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "sim.yaml"
    config.write_text(f"synthetic: true\nnum-requests: 12\nrequest-rate: 8\noutput-len: 8\n"
                      f"out: {tmp_path / 'out'}\nno-plots: true\n")
    assert main(["simulate", "--config", str(config), "--num-requests", "10"]) == 0
    assert "10 finished" in capsys.readouterr().out
    assert (tmp_path / "out" / "summary.json").exists()


def test_threads_default_to_the_usable_cores_and_are_validated() -> None:
    args = build_parser().parse_args(["serve"])
    assert args.threads is None and EngineConfig().threads is None  # None: the affinity mask
    _, engine = build_configs(build_parser().parse_args(["serve", "-t", "3"]))
    assert engine.threads == 3
    with pytest.raises(ValueError, match="threads"):
        EngineConfig(threads=0)
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert f"the {len(os.sched_getaffinity(0))} cores this process may use" in help_text


def test_pin_threads_is_on_by_default_and_can_be_turned_off() -> None:
    _, engine = build_configs(build_parser().parse_args(["serve"]))
    assert engine.pin_threads and EngineConfig().pin_threads
    _, engine = build_configs(build_parser().parse_args(["serve", "--no-pin-threads"]))
    assert not engine.pin_threads


def test_commands_without_config_reject_it(tmp_path: pathlib.Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bench.yaml"
    config.write_text("num-prompts: 3\n")
    argv = ["bench", "--model", "m", "--config", str(config)]
    assert _expand(argv) == argv  # left for argparse, which refuses it
    with pytest.raises(SystemExit):
        main(argv)
    assert "unrecognized arguments: --config" in capsys.readouterr().err
