"""The training commands' --help: every flag says what it does, and each description reads as a sentence."""
import importlib

import pytest

from train import decoder, pretrain
from train.config import config_parser, doc_summary


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
