"""Checkpoint files for the command line: .pt/.pth and .safetensors read and written, nested
training checkpoints walked, every write atomic; files that are not checkpoints are refused with
an error naming the file."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import wnorm
from wnorm import WnormError
from wnorm._files import convert_checkpoint, find_state_dicts, load_checkpoint, save_checkpoint

OLD: Callable[[nn.Module], nn.Module] = nn.utils.weight_norm
NEW: Callable[[nn.Module], nn.Module] = parametrizations.weight_norm


def model(norm: Callable[[nn.Module], nn.Module] = wnorm.weight_norm) -> nn.Sequential:
    """Three normalized layers and a plain one."""
    torch.manual_seed(0)
    return nn.Sequential(norm(nn.Conv1d(3, 4, 3)), nn.Tanh(), norm(nn.ConvTranspose1d(4, 4, 2)),
                         nn.Conv1d(4, 2, 1), norm(nn.Conv1d(2, 2, 1)))


def pure(norm: Callable[[nn.Module], nn.Module] | None) -> dict[str, torch.Tensor]:
    return dict(model(norm or (lambda m: m)).state_dict())


def sample() -> dict[str, torch.Tensor]:
    return pure(wnorm.weight_norm)


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_nested_checkpoint_converts_the_state_dict_and_keeps_the_rest() -> None:
    ckpt = {"generator": pure(OLD), "optim_g": {"lr": 0.1}, "steps": 12}
    assert find_state_dicts(ckpt) == [("generator",)]
    out, n = convert_checkpoint(ckpt, "plain")
    assert n == 3 and out["steps"] == 12 and out["optim_g"] == {"lr": 0.1}
    assert "0.weight" in out["generator"] and "0.weight_g" in ckpt["generator"]
    assert out["generator"]["3.weight"] is ckpt["generator"]["3.weight"]  # plain: untouched


def test_an_optimizer_state_beside_the_model_is_neither_converted_nor_listed() -> None:
    # DCP's dcp_to_torch_save writes {"model": ..., "optim": ...}: the optimizer's per-parameter
    # dicts of tensors (exp_avg, ...) were listed as converted state dicts, though unchanged
    net = wnorm.apply(nn.Sequential(nn.Linear(3, 4)))
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 3)).sum().backward()
    opt.step()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    ckpt = {"model": net.state_dict(), "optim": get_optimizer_state_dict(net, opt)}
    assert "0.weight_g" in ckpt["optim"]["state"]  # keyed by name, as DCP keys it
    assert find_state_dicts(ckpt) == [("model",)]
    out, n = convert_checkpoint(ckpt, "plain")
    assert n == 1 and "0.weight" in out["model"] and out["optim"] is ckpt["optim"]


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_save_and_load_round_trip(tmp_path: Path, suffix: str) -> None:
    pytest.importorskip("safetensors") if suffix == ".safetensors" else None
    sd = pure(NEW)
    save_checkpoint(sd, tmp_path / f"c{suffix}")
    back = load_checkpoint(tmp_path / f"c{suffix}")
    assert same_state(dict(back), sd) if suffix != ".safetensors" else (
        sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd))


def test_file_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(WnormError, match=r"notes.pt: not a PyTorch checkpoint"):
        load_checkpoint(text)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(WnormError, match=r"meta.pt: not a checkpoint: expected a state dict"):
        load_checkpoint(tmp_path / "meta.pt")
    with pytest.raises(WnormError, match=r"nope.pt: expected a checkpoint file; got no such"):
        load_checkpoint(tmp_path / "nope.pt")
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x00" * 5)
    pytest.importorskip("safetensors")
    with pytest.raises(WnormError, match=r"fake.safetensors: not a readable safetensors file"):
        load_checkpoint(fake)
    with pytest.raises(WnormError, match=r"out.safetensors: a .safetensors file holds a flat"):
        save_checkpoint({"model": pure(None), "step": 1}, tmp_path / "out.safetensors")


def test_missing_safetensors_package_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(WnormError, match=r"x.safetensors: .*pip install safetensors"):
        save_checkpoint({"w": torch.ones(1)}, tmp_path / "x.safetensors")


# --------------------------------------------------------------------------- not checkpoints
def file_cases(tmp: Path) -> list[tuple[Path, str]]:
    gen = torch.Generator().manual_seed(0)
    noise = bytes(torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).tolist())
    cases = []
    for suffix in (".pt", ".safetensors"):
        p = tmp / f"random{suffix}"
        p.write_bytes(noise)
        cases.append((p, "random" + suffix.replace(".", r"\.")))
        p = tmp / f"empty{suffix}"
        p.write_bytes(b"")
        cases.append((p, "empty" + suffix.replace(".", r"\.")))
        p = tmp / f"notes{suffix}"
        p.write_text("epoch 3, loss 0.12\n")
        cases.append((p, "notes" + suffix.replace(".", r"\.")))
    whole = tmp / "whole.pt"
    torch.save(sample(), whole)
    truncated = tmp / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    cases.append((truncated, r"truncated\.pt: not a PyTorch checkpoint"))
    bare = tmp / "tensor.pt"
    torch.save(torch.ones(3), bare)
    cases.append((bare, r"tensor\.pt: not a checkpoint"))
    listed = tmp / "list.pt"
    torch.save([torch.ones(3)], listed)
    cases.append((listed, r"list\.pt: not a checkpoint"))
    pickled = tmp / "pickled_model.pt"
    torch.save(model(), pickled)  # a whole module: not loadable with weights_only=True
    cases.append((pickled, r"pickled_model\.pt: not a PyTorch checkpoint readable with "
                           r"weights_only=True"))
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 999]}})
    bad_st = tmp / "bad_offsets.safetensors"
    bad_st.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\x00" * 16)
    cases.append((bad_st, r"bad_offsets\.safetensors: not a readable safetensors file"))
    return cases


def test_files_that_are_not_checkpoints_are_refused_naming_the_file(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    for path, match in file_cases(tmp_path):
        with pytest.raises(WnormError, match=match):
            load_checkpoint(path)


# --------------------------------------------------------------------------- writing files
def test_save_into_an_unwritable_directory_names_the_file(tmp_path: Path, monkeypatch) -> None:
    import os

    real_open = os.open

    def denied(path, *args, **kwargs):
        if Path(path).parent == tmp_path:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(WnormError, match=r"out\.pt: cannot write a file there; got Permission "
                                         r"denied"):
        save_checkpoint(sample(), tmp_path / "out.pt")
    assert list(tmp_path.iterdir()) == []


def test_save_over_a_file_keeps_its_permissions_and_a_symlink_stays_a_link(
    tmp_path: Path,
) -> None:
    import os

    real = tmp_path / "real.pt"
    real.write_bytes(b"old")
    os.chmod(real, 0o640)
    link = tmp_path / "link.pt"
    link.symlink_to(real)
    save_checkpoint(sample(), link)
    assert link.is_symlink() and os.stat(real).st_mode & 0o777 == 0o640
    assert sorted(load_checkpoint(real)) == sorted(sample())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.pt", "real.pt"]


def test_load_names_a_directory_as_a_directory(tmp_path: Path) -> None:
    with pytest.raises(WnormError, match=r"expected a checkpoint file; got a directory"):
        load_checkpoint(tmp_path)


def test_save_metadata_goes_to_safetensors_only(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    with pytest.raises(WnormError, match=r"out\.pt: metadata is written to .safetensors files"):
        save_checkpoint(sample(), tmp_path / "out.pt", metadata={"format": "pt"})
    with pytest.raises(WnormError, match=r"out\.safetensors: expected metadata of names to "
                                         r"strings"):
        save_checkpoint(sample(), tmp_path / "out.safetensors", metadata={"step": 3})
    assert list(tmp_path.iterdir()) == []


def test_a_plain_state_dict_beside_a_normalized_one_stays_plain():
    # a GAN checkpoint: converting the generator's layout must leave the plain discriminator
    # loadable by its own model
    gen = nn.Sequential(parametrizations.weight_norm(nn.Conv1d(2, 3, 3)))
    disc = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(4, 1))
    ckpt = {"generator": gen.state_dict(), "discriminator": disc.state_dict(), "steps": 10}
    for to in ("torch-old", "wnorm", "torch-new"):
        out, n = convert_checkpoint(ckpt, to)
        assert n == (0 if to == "torch-new" else 1)
        other = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(4, 1))
        other.load_state_dict(out["discriminator"])  # strict: still plain keys
        assert out["steps"] == 10
    plain_only, n = convert_checkpoint({"discriminator": disc.state_dict()}, "torch-old")
    assert n == 2 and "0.weight_g" in plain_only["discriminator"]  # nothing normalized: do it


@pytest.mark.parametrize("drop", ["0.weight_g", "0.parametrizations.weight.original0"])
def test_half_a_pair_is_an_error_naming_the_missing_key(drop):
    api = nn.utils.weight_norm if drop.endswith("_g") else parametrizations.weight_norm
    sd = dict(nn.Sequential(api(nn.Conv1d(2, 3, 3))).state_dict())
    del sd[drop]
    for to in ("plain", "torch-old", "torch-new", "wnorm"):
        with pytest.raises(WnormError, match=rf"is half of a weight-norm pair: '{drop}' is "
                                             "missing"):
            wnorm.convert_state_dict(sd, to)


@pytest.mark.parametrize("data", [b"just some notes\n", bytes(range(256)) * 4],
                         ids=["text", "random bytes"])
def test_a_file_that_is_no_pickle_gets_no_advice_to_unpickle_it(tmp_path: Path, data):
    path = tmp_path / "junk.pt"
    path.write_bytes(data)
    with pytest.raises(WnormError, match=r"junk.pt: not a PyTorch checkpoint") as e:
        load_checkpoint(path)
    assert "weights_only=False" not in str(e.value) and "set to `False`" not in str(e.value)


def test_a_nested_checkpoint_passed_as_a_state_dict_names_the_entry_that_holds_one():
    sd = nn.Linear(2, 2).state_dict()
    opt = {"state": {}, "param_groups": [{"lr": 0.1}]}
    for ckpt in ({"epoch": 3, "model": sd, "optimizer": opt}, {"optimizer": opt, "model": sd}):
        with pytest.raises(WnormError, match=r"not a tensor; a nested checkpoint\? pass the "
                                             r"state dict inside it \(checkpoint\['model'\]\)"):
            wnorm.convert_state_dict(ckpt, "plain")


def test_a_safetensors_target_names_the_entry_that_is_no_tensor(tmp_path: Path) -> None:
    # a module's _extra_state (any object) in a flat state dict: the error listed the first
    # ten keys, none of them the culprit, and advised --key, which picks nothing in a flat one
    pytest.importorskip("safetensors")
    sd = {**{f"{i}.weight": torch.ones(2, 2) for i in range(12)}, "12._extra_state": {"step": 3}}
    with pytest.raises(WnormError) as info:
        save_checkpoint(sd, tmp_path / "out.safetensors")
    message = str(info.value)
    assert "'12._extra_state'" in message and "dict" in message and ".pt file" in message
    assert "--key" not in message
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_neither_zip_nor_pickle_is_named_so(tmp_path):
    # torch's KeyError('101') gave the message "...; got 101"
    from wnorm._files import load_checkpoint

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello")
    with pytest.raises(wnorm.WnormError, match=r"junk.pt: not a PyTorch checkpoint .*; got "
                                               r"(neither a zip nor a pickle file|no pickle)"):
        load_checkpoint(junk)
