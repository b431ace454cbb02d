"""The training commands' --help: every flag says what it does, and each description reads as a sentence; a wrong file
or setting is said in one line."""
import errno
import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from train import decoder, pretrain, runtime
from train.config import config_parser, doc_summary, run_command
from train.objective import ema_update
from train.runtime import save_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config_cls", [pretrain.PretrainConfig, decoder.DecoderTrainConfig])
def test_every_flag_has_help(config_cls):
    flags = [action for action in config_parser(config_cls)._actions if action.option_strings]
    assert len(flags) > 20
    missing = [action.option_strings[0] for action in flags if not (action.help or "").strip()]
    assert not missing, f"flags without help: {missing}"


@pytest.mark.parametrize("module", [pretrain, decoder])
def test_help_prints_each_flag_with_its_default(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS training steps" in text and "(default: auto)" in text


@pytest.mark.parametrize("name", ["pretrain", "decoder", "default", "replace_decoder", "eval", "eval_decoder",
                                  "examples", "sweep"])
def test_command_descriptions_are_whole_sentences(name):
    summary = doc_summary(importlib.import_module(f"train.{name}").__doc__)
    assert summary and summary.endswith("."), summary


# ----- a mistake in what was given: one line, exit 2; a bug keeps its traceback ----------------------------------

@pytest.mark.parametrize("name, argv, message", [
    ("pretrain", ["--config", "no/such.yaml"], "error: config file not found: no/such.yaml"),
    ("pretrain", ["--steps", "0"], "error: PretrainConfig: steps must be positive, got 0"),
    ("eval", ["--checkpoint", "tests"], "error: tests: missing config.json; a model folder holds"),
    ("export_checkpoint", ["README.md"], "error: README.md: not a PyTorch checkpoint"),
])
def test_a_command_given_a_wrong_file_or_setting_says_so_in_one_line(name, argv, message):
    result = subprocess.run([sys.executable, "-m", f"train.{name}", *argv], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr


def test_a_bug_keeps_its_traceback_even_in_our_code():
    def shapes_do_not_match():  # torch raises from inside a line of ours: a bug, not a message for the user
        ema_update([torch.zeros(2)], [torch.zeros(3)], 0.99)

    with pytest.raises(RuntimeError, match="must match"):
        run_command(shapes_do_not_match)
    assert run_command(lambda: pretrain.main(["--steps", "0"])) == 2  # a raise statement of ours: its message
    assert run_command(lambda: None) == 0


def test_a_full_or_read_only_disk_is_named_in_one_line(capsys):
    for code in (errno.ENOSPC, errno.EROFS):
        def writes_nowhere():
            raise OSError(code, os.strerror(code), "runs/x/log.csv")  # as open() or mkdir() raise it

        assert run_command(writes_nowhere) == 2
        assert capsys.readouterr().err.startswith(f"error: [Errno {code}] {os.strerror(code)}: 'runs/x/log.csv'")


def test_a_checkpoint_that_does_not_fit_on_the_disk_leaves_no_temp_file_and_says_why(tmp_path, monkeypatch):
    save_checkpoint({"step": 1}, tmp_path, 1, keep_last=2)

    def torch_save_on_a_full_disk(state, path):  # what torch.save raises when the disk fills mid-write
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4194304 vs 4194200")

    monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    with pytest.raises(OSError, match="No space left on device for .*ckpt-00000002.pt") as raised:
        save_checkpoint({"step": 2}, tmp_path, 2, keep_last=2)
    assert raised.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.pt"]  # the good one kept, no .tmp left
    monkeypatch.setattr(runtime.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**9))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # with room on the disk it is not a full disk
        save_checkpoint({"step": 2}, tmp_path, 2, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.pt"]


def test_a_config_file_that_is_not_yaml_settings_says_so(tmp_path):
    (tmp_path / "bad.yaml").write_text("steps: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- steps\n")
    for name, message in (("bad.yaml", "is not valid YAML"), ("list.yaml", "holds list, not settings")):
        with pytest.raises(ValueError, match=message):
            pretrain.main(["--config", str(tmp_path / name)])


def test_a_flag_of_the_wrong_type_is_named_with_the_type_it_needs(capsys):
    with pytest.raises(SystemExit):
        pretrain.main(["--lr", "abc"])
    assert "argument --lr: expected float, got 'abc'" in capsys.readouterr().err
