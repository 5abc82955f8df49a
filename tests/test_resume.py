"""Exact resume: train, save model + optimizer (+ RNG) state, continue; a fresh process-like
restart from the file continues bitwise identically (``torch.equal`` on every tensor)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import wnorm
from wnorm.state_dict import load_state_dict as wnorm_load_state_dict

N, K = 4, 4  # steps before the save, steps after it


class Net(nn.Module):
    """Conv + mean-only BN + dropout, and an LSTM over the pooled rows: every weight kind."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False),
            wnorm.MeanOnlyBatchNorm2d(6),
            nn.LeakyReLU(0.1),
            nn.Dropout(0.2),  # random: the RNG state is part of the checkpoint
            nn.Conv2d(6, 6, 3, padding=1),
        )
        self.lstm = nn.LSTM(6, 5, batch_first=True)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean(dim=3).transpose(1, 2)  # (N, H, C): a sequence over rows
        return self.head(self.lstm(h)[0][:, -1])


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 4, (8,), generator=gen))
            for _ in range(N + K)]


def fresh(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = wnorm.apply(Net())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    return model, opt


def train(model: nn.Module, opt: torch.optim.Optimizer, batches) -> None:
    model.train()
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            out[f"opt.{i}.{k}"] = v.clone() if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"not bitwise equal after resume: {differ}"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The uninterrupted run: data init, N steps, save to a file, K more steps (once per file)."""
    tmp_path = tmp_path_factory.mktemp("resume")
    torch.use_deterministic_algorithms(True)
    try:
        batches = data()
        model, opt = fresh(seed=0)
        with pytest.warns(UserWarning, match="lstm .recurrent layer"):
            wnorm.data_init(model, batches[0][0])  # the LSTM is skipped, with a warning
        train(model, opt, batches[:N])
        path = tmp_path / "ckpt.pt"
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(),
                    "rng": torch.get_rng_state()}, path)
        whole = tmp_path / "whole.pt"
        torch.save({"model": model, "optim": opt.state_dict(), "rng": torch.get_rng_state()},
                   whole)
        train(model, opt, batches[N:])
        yield path, whole, batches, state(model, opt), model
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("loader", ["torch", "wnorm"])
def test_resume_from_state_dicts_is_bitwise_identical(run, loader: str) -> None:
    path, _, batches, expected, _ = run
    model, opt = fresh(seed=123)  # a different init: everything must come from the file
    ckpt = torch.load(path, weights_only=True)
    if loader == "torch":
        model.load_state_dict(ckpt["model"])
    else:
        wnorm_load_state_dict(model, ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    torch.set_rng_state(ckpt["rng"])
    train(model, opt, batches[N:])
    assert_bitwise(state(model, opt), expected)


def test_resume_from_a_pickled_model_is_bitwise_identical(run) -> None:
    _, whole, batches, expected, _ = run
    ckpt = torch.load(whole, weights_only=False)
    model = ckpt["model"]
    assert wnorm.is_weight_normalized(model.conv[0]) and wnorm.is_weight_normalized(model.lstm)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    opt.load_state_dict(ckpt["optim"])
    torch.set_rng_state(ckpt["rng"])
    train(model, opt, batches[N:])
    assert_bitwise(state(model, opt), expected)


def test_resumed_model_gives_the_same_eval_outputs(run) -> None:
    path, _, batches, _, original = run
    model, opt = fresh(seed=5)
    ckpt = torch.load(path, weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    torch.set_rng_state(ckpt["rng"])
    train(model, opt, batches[N:])
    x = batches[0][0]
    with torch.no_grad():  # the cached inference path on both
        assert torch.equal(model.eval()(x), original.eval()(x))


# wnorm.optim: the layers run on a plain weight that the kernel's step writes from the new g and
# v; a resumed run computes its first plain weight from the loaded g and v, which must give the
# same bits, or the two runs drift apart from the first step after the resume.
_WNORM_OPTIMS = [("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)),
                 ("Adam", dict(lr=3e-3, weight_decay=1e-4)),
                 ("AdamW", dict(lr=3e-3))]


def _wnorm_run(name: str, kw: dict, seed: int, batches, ckpt: io.BytesIO | None = None):
    """Data init, N steps with wnorm.optim.<name>, checkpoints, K more steps; or, given one of
    those checkpoints, a fresh start from it and the K steps. Returns the model, the optimizer
    and the checkpoints (state dicts, pickled model)."""
    torch.manual_seed(seed)
    model = wnorm.apply(Net())
    if ckpt is None:
        with pytest.warns(UserWarning, match="lstm .recurrent layer"):
            wnorm.data_init(model, batches[0][0])
    else:
        saved = torch.load(ckpt, weights_only=False)
        model = saved["model"] if isinstance(saved["model"], nn.Module) else model
        if not isinstance(saved["model"], nn.Module):
            model.load_state_dict(saved["model"])
    opt = getattr(wnorm.optim, name)(model, **kw)
    assert opt.fused_layers() == ["conv.0.weight", "conv.4.weight", "head.weight"]
    if ckpt is not None:
        opt.load_state_dict(saved["optim"])
        torch.set_rng_state(saved["rng"])
        train(model, opt, batches[N:])
        return model, opt, ()
    train(model, opt, batches[:N])
    files = (io.BytesIO(), io.BytesIO())
    for f, m in zip(files, (model.state_dict(), model)):
        torch.save({"model": m, "optim": opt.state_dict(), "rng": torch.get_rng_state()}, f)
        f.seek(0)
    train(model, opt, batches[N:])
    return model, opt, files


@pytest.mark.parametrize("name,kw", _WNORM_OPTIMS, ids=[n for n, _ in _WNORM_OPTIMS])
def test_resume_with_wnorm_optim_is_bitwise_identical(name: str, kw: dict) -> None:
    batches = data()
    model, opt, files = _wnorm_run(name, kw, 0, batches)
    expected = state(model, opt)
    for f in files:  # from state dicts, from a pickled model
        resumed, ropt, _ = _wnorm_run(name, kw, 123, batches, ckpt=f)
        assert_bitwise(state(resumed, ropt), expected)
