"""The wnorm command line: convert files between layouts; errors are one line on stderr, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import wnorm
from wnorm.checkpoint import load_checkpoint, load_state_dict
from wnorm.cli import main


def net(norm=lambda m: m) -> nn.Sequential:
    return nn.Sequential(norm(nn.Conv1d(2, 4, 3)), nn.LeakyReLU(0.1),
                         norm(nn.ConvTranspose1d(4, 3, 4, 2, 1)))


def source() -> nn.Sequential:
    torch.manual_seed(0)
    model = net(nn.utils.parametrizations.weight_norm)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5 + torch.rand(p.shape))
    return model.eval()


X = torch.randn(2, 2, 9, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("to,suffix", [("plain", ".pt"), ("torch-old", ".pth"),
                                       ("torch-new", ".pt"), ("wnorm", ".safetensors")])
def test_convert_file_keeps_outputs(tmp_path: Path, capsys, to: str, suffix: str) -> None:
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    model = source()
    torch.save(model.state_dict(), tmp_path / "in.pt")
    out = tmp_path / f"out{suffix}"
    assert main(["convert", str(tmp_path / "in.pt"), str(out), "--to", to]) == 0
    line = capsys.readouterr().out.strip()
    n = 2 if to in ("plain", "torch-old", "wnorm") else 0  # torch-new -> torch-new: renames none
    assert line.endswith(f"{n} weight(s) converted to {to} (checkpoint)")
    target = wnorm.apply(net()).eval()
    load_state_dict(target, load_checkpoint(out))
    with torch.no_grad():
        torch.testing.assert_close(target(X), model(X), rtol=1e-5, atol=1e-6)


def test_convert_nested_with_key_keeps_other_entries(tmp_path: Path, capsys) -> None:
    sd = source().state_dict()
    torch.save({"generator": sd, "discriminator": sd, "steps": 5}, tmp_path / "g.pt")
    code = main(["convert", str(tmp_path / "g.pt"), str(tmp_path / "o.pt"), "--to", "plain",
                 "--key", "generator"])
    assert code == 0
    assert "2 weight(s) converted to plain (checkpoint['generator'])" in capsys.readouterr().out
    out = torch.load(tmp_path / "o.pt", weights_only=True)
    assert out["steps"] == 5 and "0.weight" in out["generator"]
    assert "0.parametrizations.weight.original0" in out["discriminator"]


def test_errors_are_one_line_on_stderr_with_status_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "a.pt").write_text("hello")
    assert main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--to", "plain"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wnorm: error: ") and "a.pt: not a PyTorch checkpoint" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    torch.save({"model": source().state_dict()}, tmp_path / "c.pt")
    assert main(["convert", str(tmp_path / "c.pt"), str(tmp_path / "d.pt"), "--to", "plain",
                 "--key", "ema"]) == 2
    assert "expected key 'ema' in the checkpoint; got keys ['model']" in capsys.readouterr().err
    assert not (tmp_path / "d.pt").exists()


def test_bad_arguments_exit_2(capsys) -> None:
    assert main(["convert", "a.pt", "b.pt", "--to", "onnx"]) == 2
    assert "invalid choice: 'onnx'" in capsys.readouterr().err
    assert main([]) == 2


def test_repro_forwards_its_arguments(monkeypatch, capsys) -> None:
    import types

    seen = []
    fake_main = types.ModuleType("wnorm.repro.__main__")
    fake_main.main = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wnorm.repro", types.ModuleType("wnorm.repro"))
    monkeypatch.setitem(sys.modules, "wnorm.repro.__main__", fake_main)
    assert main(["repro", "demo", "--epochs", "1", "-h"]) == 0
    assert seen == [["demo", "--epochs", "1", "-h"]]


def test_repro_help_reaches_the_real_module(capsys) -> None:
    pytest.importorskip("wnorm.repro.__main__")
    assert main(["repro", "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


def test_repro_missing_is_a_clear_error(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "wnorm.repro", None)  # import fails as if absent
    monkeypatch.setitem(sys.modules, "wnorm.repro.__main__", None)
    assert main(["repro", "demo"]) == 2
    assert "wnorm: error: the repro command needs wnorm.repro" in capsys.readouterr().err


def test_module_entry_point_in_a_subprocess(tmp_path: Path) -> None:
    torch.save({"state_dict": source().state_dict(), "epoch": 1}, tmp_path / "in.pt")
    done = subprocess.run(
        [sys.executable, "-m", "wnorm.cli", "convert", str(tmp_path / "in.pt"),
         str(tmp_path / "out.pt"), "--to", "torch-old"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "2 weight(s) converted to torch-old (checkpoint['state_dict'])" in done.stdout
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["epoch"] == 1 and "2.weight_g" in out["state_dict"]
