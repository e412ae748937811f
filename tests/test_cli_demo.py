"""``conslaw demo`` and ``conslaw inspect`` end to end."""

from __future__ import annotations

import textwrap

import pytest
import torch

from torch_conslaw.cli import main


def test_demo_prints_tables_and_writes_figures(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert main(["demo", "--out", str(tmp_path), "--steps", "40"]) == 0
    out = capsys.readouterr().out
    assert torch.get_num_threads() == threads
    assert out.count("max rel drift") == 5 and "conv1→conv2" in out and "broken" in out
    assert "self_attn.h0 q·k" in out and "linear1→linear2" in out  # the transformer layer
    # the LLaMA-style block: RoPE planes per K/V group, V/O per K/V group, SwiGLU up → down
    assert "q_proj q·k k_proj [block 0, planes of 2]" in out and "up_proj→down_proj" in out
    assert "log-log slope" in out
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == sorted([
        "demo_mlp_laws.png", "demo_mlp_sgd_drift.png", "demo_mlp_sgd_split.png",
        "demo_mlp_adam_split.png", "demo_cnn_sgd_drift.png", "demo_transformer_sgd_drift.png",
        "demo_drift_vs_lr.png", "demo_llama_sgd_drift.png", "demo_llama_sgd_split.png",
    ])


MODEL_FILE = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc1 = nn.Linear(4 * 2 * 2, 6)
            self.fc2 = nn.Linear(6, 2)

        def forward(self, x):
            if x.sum() > 1e9:  # untraceable by torch.fx: the hooks fallback needs an input
                return x
            x = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 2).flatten(1)
            return self.fc2(torch.tanh(self.fc1(x)))

    def make_model():
        return Net()
    """
)


def test_inspect_prints_structure_groups_and_skipped(tmp_path, capsys):
    path = tmp_path / "net.py"
    path.write_text(MODEL_FILE)
    assert main(["inspect", f"{path}:make_model", "--input-shape", "1,3,8,8"]) == 0
    out = capsys.readouterr().out
    assert "structure found with hooks" in out
    assert "conv→fc1: 4 channel group(s)" in out and "4 columns per channel" in out
    assert "law groups: 1 (4 laws)" in out
    assert "tanh between fc1 and fc2 is not positively homogeneous" in out


def test_inspect_without_input_explains_and_bad_targets_fail_clearly(tmp_path, capsys):
    path = tmp_path / "net.py"
    path.write_text(MODEL_FILE)
    assert main(["inspect", f"{path}:make_model"]) == 0
    assert "pass example_input" in capsys.readouterr().out
    assert main(["inspect", f"{path}:missing"]) == 2
    assert "defines no model 'missing'" in capsys.readouterr().err
    assert main(["inspect", str(path)]) == 2
    assert "must look like path/to/file.py:model" in capsys.readouterr().err
    assert main(["inspect", f"{path}:make_model", "--input-shape", "1,x"]) == 2
    assert "--input-shape must be comma-separated integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect"])
