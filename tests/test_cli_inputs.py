"""``conslaw inspect`` with inputs that are not float tensors: token ids with a vocabulary
size, a dict of keyword tensors, a Python factory ``file.py:make_input``."""

from __future__ import annotations

import pytest

from torch_conslaw.cli import main

pytest.importorskip("transformers")

MODEL = """
import os
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, transformers

def make_model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)

def make_input():
    return {"input_ids": torch.randint(0, 50, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}

def make_input_for(model):
    return torch.randint(0, model.config.vocab_size, (1, 5))
"""

# 2 layers × (4 heads × 2 × 36 + ln_1 → c_attn 32 + ln_2 → c_fc 32)
LAWS = "law groups: 20 (704 laws)"


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "gpt.py"
    path.write_text(MODEL)
    return str(path)


@pytest.mark.parametrize("options", [
    ["--input-shape", "2,7", "--vocab-size", "50"],
    ["--input-shape", "input_ids=2,7:50", "--input-shape", "attention_mask=2,7:1"],
    ["--input", "{path}:make_input"],
    ["--input", "{path}:make_input_for"],
], ids=["token-ids", "dict", "factory", "factory-with-model"])
def test_inspect_takes_token_ids_dicts_and_factories(target, options, capsys):
    options = [o.replace("{path}", target) for o in options]
    assert main(["inspect", f"{target}:make_model", *options]) == 0
    out = capsys.readouterr().out
    assert LAWS in out
    assert "transformer.h.0.attn.c_attn q·k" in out and "lm_head.weight is shared" in out


def test_inspect_input_errors_name_the_option(target, capsys):
    bad = [
        (["--input", f"{target}:make_input", "--input-shape", "2,7"], "either --input"),
        (["--input-shape", "input_ids=2,7:50", "--input-shape", "2,7"], "name every input"),
        (["--input-shape", "input_ids=2,7:x"], "integer bound"),
    ]
    for options, message in bad:
        assert main(["inspect", f"{target}:make_model", *options]) == 2
        assert message in capsys.readouterr().err


def test_inspect_of_a_model_that_cannot_run_on_the_input_names_the_input_and_the_options(target, capsys):
    """Float ids for a token model (the embedding refuses them): an input error, not a traceback."""
    assert main(["inspect", f"{target}:make_model", "--input-shape", "2,7"]) == 2
    err = capsys.readouterr().err
    assert "cannot run on the example input (a float32 tensor of shape (2, 7))" in err
    assert "--vocab-size" in err and "Traceback" not in err
