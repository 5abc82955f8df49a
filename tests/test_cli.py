"""The wnorm command line: convert files between layouts (keeping each weight's axis unless --dim
says otherwise); errors are one line on stderr, exit 2. Folders: tests/test_pretrained.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nets import ThreeWays
from torch import nn

import wnorm
from wnorm._files import load_checkpoint
from wnorm.state_dict import load_state_dict
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
    assert main(["repro", "demo"]) == 2  # the experiments moved out of the package
    assert "invalid choice: 'repro'" in capsys.readouterr().err
    for bad in ("-1", "two", "1.5"):
        assert main(["convert", "a.pt", "b.pt", "--to", "torch-old", "--dim", bad]) == 2
        assert f"expected 'keep', 'none' (one norm over the whole tensor), an axis >= 0 or " \
               f"KEY=AXIS,... (those weights only); got '{bad}'" in capsys.readouterr().err
    for bad in ("1.weight=-1", "=0", "1.weight=keep"):
        assert main(["convert", "a.pt", "b.pt", "--to", "wnorm", "--dim", bad]) == 2
        assert "got '" in capsys.readouterr().err
    # a key named twice: the last axis won without a word
    assert main(["convert", "a.pt", "b.pt", "--to", "wnorm", "--dim", "0.weight=0,0.weight=1"]) == 2
    assert "'0.weight' is named twice" in capsys.readouterr().err
    assert main(["convert", "a.pt", "b.pt", "--to", "plain", "--dim", "0"]) == 2
    assert "--dim chooses the axis of g and v; --to plain writes w alone" in (
        capsys.readouterr().err)


def pos_conv_checkpoint(path: Path) -> nn.Module:
    """A Wav2Vec2-style positional conv (weight-normalized along dim 2) saved at ``path``."""
    torch.manual_seed(0)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 5, padding=2, groups=2), dim=2)
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(1.5 + torch.rand(1, 1, 5))
    torch.save({"model": conv.state_dict(), "step": 3}, path)
    return conv.eval()


@pytest.mark.parametrize("to,api", [("torch-old", nn.utils.weight_norm),
                                    ("torch-new", nn.utils.parametrizations.weight_norm)])
def test_convert_keeps_each_weights_dim_unless_told(tmp_path: Path, capsys, to: str, api) -> None:
    source = pos_conv_checkpoint(tmp_path / "in.pt")
    x = torch.randn(1, 4, 9)
    for dim, args in ((2, []), (2, ["--dim", "keep"]), (0, ["--dim", "0"]),
                      (None, ["--dim", "none"])):
        out = tmp_path / f"out{len(args)}{dim}.pt"
        assert main(["convert", str(tmp_path / "in.pt"), str(out), "--to", to] + args) == 0
        target = api(nn.Conv1d(4, 4, 5, padding=2, groups=2), dim=dim).eval()
        ckpt = torch.load(out, weights_only=True)
        target.load_state_dict(ckpt["model"])  # PyTorch's own strict loader
        assert ckpt["step"] == 3
        with torch.no_grad():
            if dim == 2:  # kept: renamed, values untouched
                assert torch.equal(target(x), source(x))
            else:
                torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-6)
    assert main(["convert", str(tmp_path / "in.pt"), str(tmp_path / "bad.pt"), "--to", to,
                 "--dim", "3"]) == 2
    err = capsys.readouterr().err
    assert "in.pt: checkpoint['model']: " in err and "dim 3 is out of range for a tensor of " \
        "shape (4, 2, 5)" in err and not (tmp_path / "bad.pt").exists()


def test_a_plain_checkpoint_to_wnorm_loads_into_the_applied_model_with_the_same_outputs(
        tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    source = ThreeWays().eval()
    torch.save(source.state_dict(), tmp_path / "in.pt")
    x = torch.tensor([[0, 3, 0, 7, 9]])
    # without axes: plain weights stay plain (wnorm.load_state_dict reads them), and it says so
    assert main(["convert", str(tmp_path / "in.pt"), str(tmp_path / "a.pt"), "--to", "wnorm"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("wnorm: warning: convert to 'wnorm': 3 plain weight(s) ") and \
        "--dim emb.weight=AXIS" in err and err.count("\n") == 1
    target = wnorm.apply(ThreeWays()).eval()
    load_state_dict(target, torch.load(tmp_path / "a.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    # with apply's axes named: the applied model's own strict loader takes the file
    assert main(["convert", str(tmp_path / "in.pt"), str(tmp_path / "b.pt"), "--to", "wnorm",
                 "--dim", "up.weight=1,out.weight=0"]) == 0
    assert "2 weight(s) converted to wnorm" in capsys.readouterr().out
    target = wnorm.apply(ThreeWays()).eval()
    target.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    # the keys name one state dict's weights: a checkpoint holding several needs --key
    torch.save({"tagger": source.state_dict(), "head": nn.Linear(2, 2).state_dict()},
               tmp_path / "two.pt")
    args = ["convert", str(tmp_path / "two.pt"), str(tmp_path / "c.pt"), "--to", "wnorm",
            "--dim", "up.weight=1,out.weight=0"]
    assert main(args) == 2
    assert "names the weights of one state dict; got several, at checkpoint['tagger'], " \
        "checkpoint['head']: pick the one they belong to with --key" in capsys.readouterr().err
    assert main(args + ["--key", "tagger"]) == 0
    target = wnorm.apply(ThreeWays()).eval()
    target.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True)["tagger"])


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


# --------------------------------------------------------------------------- output safety
def small_checkpoint(path: Path) -> bytes:
    torch.save(wnorm.weight_norm(nn.Linear(3, 2)).state_dict(), path)
    return path.read_bytes()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hardlink"])
def test_out_that_is_in_is_refused_before_reading_or_writing(tmp_path: Path, capsys,
                                                             spelling: str) -> None:
    (tmp_path / "sub").mkdir()
    src = tmp_path / "net.pt"
    data = small_checkpoint(src)
    out = {"same": src, "dotdot": tmp_path / "sub" / ".." / "net.pt",
           "symlink": tmp_path / "link.pt", "hardlink": tmp_path / "hard.pt"}[spelling]
    if spelling == "symlink":
        out.symlink_to(src)
    elif spelling == "hardlink":
        out.hardlink_to(src)
    assert main(["convert", str(src), str(out), "--to", "plain"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"wnorm: error: {out}: expected an output file other than the input")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert src.read_bytes() == data and leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ["missing-dir-pt", "missing-dir-safetensors", "out-is-dir",
                                  "in-is-a-folder-without-weights", "folder-in-file-out"])
def test_path_errors_are_one_line_naming_the_path(tmp_path: Path, capsys, case: str) -> None:
    small_checkpoint(tmp_path / "net.pt")
    (tmp_path / "adir").mkdir()
    src, out, match = {
        "missing-dir-pt": ("net.pt", "nodir/out.pt",
                           "nodir/out.pt: expected an existing directory"),
        "missing-dir-safetensors": ("net.pt", "nodir/out.safetensors",
                                    "nodir/out.safetensors: expected an existing directory"),
        "out-is-dir": ("net.pt", "adir", "adir: expected a file name to write; got a directory"),
        "in-is-a-folder-without-weights": ("adir", "out", "adir: expected a transformers "
                                           "checkpoint folder (save_pretrained layout"),
        "folder-in-file-out": ("adir", "out.pt", "out.pt: " + str(tmp_path / "adir") + " is a "
                               "folder, converted into a new folder; expected a folder name"),
    }[case]
    code = main(["convert", str(tmp_path / src), str(tmp_path / out), "--to", "plain"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("wnorm: error: ") and match in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out").exists()


def half_written():
    """A writer that puts a few bytes in its file, then fails as a full disk would."""
    def write(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")
    return write


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_failed_write_keeps_the_previous_out_and_leaves_no_temporary_file(
    tmp_path: Path, capsys, monkeypatch, suffix: str
) -> None:
    st = pytest.importorskip("safetensors.torch")
    small_checkpoint(tmp_path / "net.pt")
    out = tmp_path / f"out{suffix}"
    assert main(["convert", str(tmp_path / "net.pt"), str(out), "--to", "plain"]) == 0
    good = out.read_bytes()
    capsys.readouterr()
    if suffix == ".pt":
        monkeypatch.setattr(torch, "save", half_written())
    else:
        monkeypatch.setattr(st, "save_file", half_written())
    assert main(["convert", str(tmp_path / "net.pt"), str(out), "--to", "torch-new",
                 "--force"]) == 2
    err = capsys.readouterr().err
    assert f"{out}: writing failed (the file there before is kept)" in err
    assert "No space left on device" in err and "Traceback" not in err
    assert out.read_bytes() == good and leftovers(tmp_path) == []
    monkeypatch.undo()
    new = tmp_path / f"new{suffix}"  # no previous file: none is left behind either
    monkeypatch.setattr(torch, "save", half_written())
    monkeypatch.setattr(st, "save_file", half_written())
    assert main(["convert", str(tmp_path / "net.pt"), str(new), "--to", "plain"]) == 2
    assert "(no file written)" in capsys.readouterr().err
    assert not new.exists() and leftovers(tmp_path) == []


def test_file_size_limit_mid_write_in_a_subprocess(tmp_path: Path) -> None:
    resource = pytest.importorskip("resource")
    torch.save(wnorm.weight_norm(nn.Linear(512, 1024)).state_dict(), tmp_path / "net.pt")
    data = (tmp_path / "net.pt").read_bytes()

    def convert(out: str, limit: int | None) -> subprocess.CompletedProcess:
        def cap() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return subprocess.run(
            [sys.executable, "-m", "wnorm.cli", "convert", str(tmp_path / "net.pt"),
             str(tmp_path / out), "--to", "torch-new"],
            capture_output=True, text=True, timeout=120, preexec_fn=cap if limit else None)

    assert convert("out.pt", None).returncode == 0
    good = (tmp_path / "out.pt").read_bytes()
    done = convert("out.pt", 256 * 1024)  # the write stops a quarter of the way
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("wnorm: error: ") and "Traceback" not in done.stderr
    assert (tmp_path / "out.pt").read_bytes() == good
    assert (tmp_path / "net.pt").read_bytes() == data and leftovers(tmp_path) == []


@pytest.mark.parametrize("extra", ["namespace", "numpy"])
def test_weights_only_refusal_names_the_type_and_what_to_do(tmp_path: Path, capsys,
                                                            extra: str) -> None:
    import argparse

    if extra == "numpy":
        np = pytest.importorskip("numpy")
        value, name = np.float64(0.9), "numpy"
    else:
        value, name = argparse.Namespace(lr=0.1), "argparse.Namespace"
    torch.save({"model": source().state_dict(), "extra": value}, tmp_path / "train.pt")
    assert main(["convert", str(tmp_path / "train.pt"), str(tmp_path / "o.pt"),
                 "--to", "plain"]) == 2
    err = capsys.readouterr().err
    assert f"Unsupported global: GLOBAL {name}" in err
    assert "\x1b" not in err and len(err.strip().splitlines()) == 1
    assert "if you trust its source" in err and "weights_only=False" in err
    assert "torch.save only its state dict" in err and repr(str(tmp_path / "train.pt")) in err


# --------------------------------------------------------------------------- .safetensors OUT
def test_key_picks_the_state_dict_a_safetensors_out_holds(tmp_path: Path, capsys) -> None:
    pytest.importorskip("safetensors")
    model = source()
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    out = tmp_path / "out.safetensors"
    args = ["convert", str(tmp_path / "ckpt.pt"), str(out), "--to", "plain"]
    assert main(args) == 2  # without --key: the error names the key to pick
    err = capsys.readouterr().err
    assert err.startswith(f"wnorm: error: {out}: a .safetensors file holds one flat state dict")
    assert "pick one with --key model" in err and not out.exists()
    assert main(args + ["--key", "model"]) == 0
    assert "only checkpoint['model'] written" in capsys.readouterr().out
    target = net().eval()
    target.load_state_dict(load_checkpoint(out))  # the flat, plain state dict itself
    with torch.no_grad():
        torch.testing.assert_close(target(X), model(X), rtol=1e-5, atol=1e-6)


def test_a_safetensors_suffix_in_capitals_is_read_and_written_as_safetensors(
        tmp_path: Path) -> None:
    # it was read as a pickle (refused) and, as OUT, written as a pickle under its name
    st = pytest.importorskip("safetensors.torch")
    model = source()
    st.save_file(model.state_dict(), str(tmp_path / "IN.SAFETENSORS"))
    out = tmp_path / "OUT.SafeTensors"
    assert main(["convert", str(tmp_path / "IN.SAFETENSORS"), str(out), "--to", "plain"]) == 0
    target = net().eval()
    target.load_state_dict(st.load_file(str(out)))  # a safetensors file, not a pickle
    with torch.no_grad():
        torch.testing.assert_close(target(X), model(X), rtol=1e-5, atol=1e-6)


def test_safetensors_metadata_is_kept_or_its_loss_is_said(tmp_path: Path, capsys) -> None:
    st = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    meta = {"format": "pt", "step": "1000"}
    st.save_file(source().state_dict(), str(tmp_path / "in.safetensors"), metadata=meta)
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(tmp_path / "in.safetensors"), str(out), "--to", "torch-old"]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == meta
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "in.safetensors"), str(tmp_path / "out.pt"),
                 "--to", "torch-old"]) == 0
    assert "safetensors metadata (keys ['format', 'step']) is not written" in (
        capsys.readouterr().out)


def test_an_existing_out_file_is_replaced_only_with_force(tmp_path: Path, capsys) -> None:
    # OUT may be another checkpoint, perhaps its only copy: it was replaced without a word
    small_checkpoint(tmp_path / "net.pt")
    other = tmp_path / "other.pt"
    torch.save({"precious": torch.ones(3)}, other)
    before = other.read_bytes()
    assert main(["convert", str(tmp_path / "net.pt"), str(other), "--to", "plain"]) == 2
    assert capsys.readouterr().err == f"wnorm: error: {other}: exists; pass --force to replace it\n"
    assert other.read_bytes() == before
    assert main(["convert", str(tmp_path / "net.pt"), str(other), "--to", "plain",
                 "--force"]) == 0
    assert "precious" not in torch.load(other)


def test_an_out_ending_in_a_slash_for_a_file_in_is_refused_not_made_a_file(
        tmp_path: Path, capsys) -> None:
    small_checkpoint(tmp_path / "net.pt")
    out = str(tmp_path / "newdir") + "/"
    assert main(["convert", str(tmp_path / "net.pt"), out, "--to", "plain"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"wnorm: error: {out}: ") and "expected a file name for OUT" in err
    assert f"(e.g. {tmp_path / 'newdir' / 'net.pt'})" in err
    assert not (tmp_path / "newdir").exists()


def test_a_checkpoint_of_another_map_is_refused_not_converted_as_a_weight_norms(
        tmp_path: Path, capsys) -> None:
    # the command line converted a centered model's (g, v) as a weight norm's, exit status 0
    model = wnorm.apply(torch.nn.Sequential(torch.nn.Linear(4, 8)),
                        method=wnorm.centered_weight_norm)
    torch.save({"model": model.state_dict(), "step": 3}, tmp_path / "c.pt")
    assert main(["convert", str(tmp_path / "c.pt"), str(tmp_path / "p.pt"), "--to", "plain"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint['model']: '0.weight' was saved by wnorm.centered_weight_norm" in err
    assert not (tmp_path / "p.pt").exists()


def test_a_missing_in_is_named_as_missing_whatever_out_looks_like(tmp_path: Path, capsys) -> None:
    # IN that does not exist, OUT ending in a slash: the error said "IN is a file"
    for out in (str(tmp_path / "newdir") + "/", str(tmp_path / "new.pt")):
        assert main(["convert", str(tmp_path / "nodir"), out, "--to", "plain"]) == 2
        err = capsys.readouterr().err
        assert err == f"wnorm: error: {tmp_path / 'nodir'}: expected a checkpoint file; got no " \
                      "such file\n"
    assert sorted(tmp_path.iterdir()) == []


def test_python_dash_m_wnorm_runs_the_command() -> None:
    # it did nothing but fail to find a __main__ where the console script is not on PATH
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "wnorm", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "usage: wnorm" in out.stdout
