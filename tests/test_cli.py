"""`open-clip-ecg`: help and version as a user runs them, every command's --help, one error handler."""
import argparse
import importlib
import shlex
import subprocess
import sys
import types

import pytest

import open_clip_ecg
from open_clip_ecg.cli import EPILOG, SUBCOMMANDS, Command, main, report_user_errors


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "open_clip_ecg.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_help_says_what_the_tool_is_how_to_use_it_and_every_command():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("usage: open-clip-ecg")
    assert "Train and evaluate ECG-text models with open_clip" in text
    assert "typical sequence" in text
    sequence = text[text.index("typical sequence"):]
    positions = [sequence.index(f"open-clip-ecg {step} ") for step in ("quickstart", "shards", "train", "evaluate")]
    assert positions == sorted(positions)
    for name, command in SUBCOMMANDS.items():
        assert name in text and command.help.split()[0] in text, name
    assert "dispatcher" not in text


def test_version_prints_the_package_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"open-clip-ecg {open_clip_ecg.__version__}"


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_command_has_help(name, capsys):
    try:
        status = main([name, "--help"])
    except SystemExit as exit_:  # argparse's help action
        status = exit_.code
    assert status == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--" in out


def test_every_command_module_follows_the_protocol():
    for name, command in SUBCOMMANDS.items():
        module = importlib.import_module(command.module)
        assert callable(module.add_arguments) and callable(module.run), name
        assert not hasattr(module, "cli_main"), name


def test_the_typical_sequence_in_help_parses():
    commands = [line.strip() for line in EPILOG.replace("\\\n", " ").splitlines()
                if line.strip().startswith("open-clip-ecg ")]
    assert len(commands) == 4
    for command in commands:
        words = shlex.split(command, comments=True)
        if words[1] == "train":  # train's flags are open_clip_train's
            continue
        parser = argparse.ArgumentParser(exit_on_error=False)
        importlib.import_module(SUBCOMMANDS[words[1]].module).add_arguments(parser)
        parser.parse_args(words[2:])


def test_a_command_can_forward_the_flags_it_does_not_define(monkeypatch, capsys):
    module = types.ModuleType("forwarding_command")

    def add_arguments(parser):
        parser.add_argument("--ecg-seconds", type=float)
        parser.set_defaults(forwarded_args=[])

    def run(args):
        print(args.ecg_seconds, args.forwarded_args)
        return 0

    module.add_arguments, module.run = add_arguments, run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(SUBCOMMANDS, "forwarding", Command(module.__name__, "forwards what it does not define"))
    assert main(["forwarding", "--model", "M", "--ecg-seconds", "5", "--lr", "1e-3"]) == 0
    assert capsys.readouterr().out == "5.0 ['--model', 'M', '--lr', '1e-3']\n"


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["--no-such-flag"]])
def test_no_or_unknown_command_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == (0 if not argv else 2)  # no argument: the help
    if argv:
        assert "usage: open-clip-ecg" in capsys.readouterr().err


def test_an_unknown_flag_of_a_command_is_argparses_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["quickstart", "--out", str(tmp_path), "--no-such-flag"])
    assert exit_.value.code == 2
    assert "open-clip-ecg quickstart: error: unrecognized arguments: --no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["shards", "--format", "csv", "--input", "{tmp}/missing.csv", "--output", "{tmp}/shards", "--no-progress"],
     "open-clip-ecg shards: error: {tmp}/missing.csv: index file not found"),
    (["evaluate", "--model", "ECG-RN18-CLIPText", "--pretrained", "{tmp}/missing.pt", "--data", "{tmp}",
      "--out", "{tmp}/report"],
     "open-clip-ecg evaluate: error: checkpoint '{tmp}/missing.pt' does not exist"),
    (["quickstart", "--out", "{tmp}/qs", "--data", "ptbxl"],
     "open-clip-ecg quickstart: error: --data 'ptbxl': expected ptbxl:PATH, cinc:PATH or csv:PATH"),
])
def test_a_user_error_is_one_line_and_exit_status_2(argv, message, tmp_path, capsys):
    status = main([word.format(tmp=tmp_path) for word in argv])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.strip().splitlines() == [message.format(tmp=tmp_path)]
    assert "Traceback" not in captured.err + captured.out


def test_missing_files_are_user_errors_and_bugs_keep_their_traceback(capsys):
    def missing():
        raise FileNotFoundError("[Errno 2] No such file or directory: 'x.json'")

    assert report_user_errors("embed", missing) == 2
    assert capsys.readouterr().err == "open-clip-ecg embed: error: [Errno 2] No such file or directory: 'x.json'\n"

    def bug():
        raise KeyError("bug")

    with pytest.raises(KeyError):
        report_user_errors("embed", bug)
