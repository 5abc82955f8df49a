"""experiments.vae: the bound is the Bernoulli/Gaussian ELBO, both variants start as the same
function, and the command trains end to end into a run folder that others_report reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from wnorm import WnormError
from experiments import vae
from experiments.report_others import report

from fakes import write_fashion


def test_neg_elbo_matches_torch_distributions() -> None:
    x = torch.bernoulli(torch.full((3, 1, 28, 28), 0.3))
    logits, mu, logvar = torch.randn(3, 1, 28, 28), torch.randn(3, 5), torch.randn(3, 5)
    recon, kl = vae.neg_elbo(x, logits, mu, logvar)
    d = torch.distributions
    want_recon = -d.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    want_kl = d.kl_divergence(d.Normal(mu, (0.5 * logvar).exp()), d.Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(recon, want_recon)
    torch.testing.assert_close(kl, want_kl)


def test_normal_and_weightnorm_start_as_the_same_function() -> None:
    """Data init of the plain layers (the paper's baseline) and of WN's g, b give one function."""
    import wnorm

    cfg = vae.VAEConfig(channels=4, latent=3)
    x = torch.bernoulli(torch.rand(64, 1, 28, 28))
    eps = torch.randn(64, 3)
    out = {}
    for variant in ("normal", "weightnorm"):
        torch.manual_seed(0)
        model = vae.build(variant, cfg)
        wnorm.data_init(model, (x, eps), include_plain=variant == "normal")
        with torch.no_grad():
            out[variant] = model(x, eps)
    assert wnorm.is_weight_normalized(vae.build("weightnorm", cfg).decoder[0])
    for a, b in zip(out["normal"], out["weightnorm"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the init standardized the encoder's output: (mu, logvar) have mean 0, std 1 per unit
    h = torch.cat(out["weightnorm"][1:], 1)
    torch.testing.assert_close(h.mean(0), torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(h.std(0, unbiased=False), torch.ones(6), atol=1e-3, rtol=0)


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(WnormError, match="unknown variant 'batchnorm'"):
        vae.build("batchnorm", vae.VAEConfig())


@pytest.mark.slow
def test_quick_run_writes_run_folders_and_report(tmp_path: Path) -> None:
    data_dir, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data_dir, n_train=120, n_test=40)
    assert vae.main(["--quick", "--seeds", "0,1", "--data-dir", str(data_dir), "--out",
                     str(out), "--epochs", "2", "--device", "cpu", "--no-progress",
                     "--train-subset", "120", "--test-subset", "40", "--init-examples",
                     "500"]) == 0
    folders = sorted(out.iterdir())
    assert [f.name for f in folders] == ["vae-normal-s0", "vae-normal-s1", "vae-weightnorm-s0",
                                         "vae-weightnorm-s1"]
    for f in folders:
        config = json.loads((f / "config.json").read_text())
        assert config["experiment"] == "vae" and config["epochs"] == 2
        assert config["channels"] == vae.QUICK["channels"] and config["data"]["train"] == 120
        assert config["init_examples"] == 120  # 500 asked of 120: what ran is recorded
        assert {"git_commit", "wnorm", "torch", "hardware"} <= set(
            json.loads((f / "version.json").read_text()))
        rows = [json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2]
        for r in rows:
            assert math.isfinite(r["test_neg_elbo"]) and r["test_neg_elbo"] > 0
            assert r["test_neg_elbo"] == pytest.approx(r["test_recon"] + r["test_kl"])
            assert r["test_kl"] >= 0 and len(r["step_losses"]) == 120 // 50
        assert "epoch 2/2" in (f / "log.txt").read_text()

    md = report([out], tmp_path / "rep")
    assert (tmp_path / "rep" / "vae.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "rep" / "report.md").read_text() == md
    assert "| normal | 2 |" in md and "| weightnorm | 2 |" in md
    assert "**Answer.** Final test bound: weightnorm" in md


def test_a_diverging_run_stops_at_the_end_of_its_epoch_naming_the_first_bad_step(
        tmp_path: Path) -> None:
    """The steps never wait for the device, so a NaN bound is found when the epoch ends; the
    run stops there and its last metrics line names the first step whose bound was bad."""
    data_dir, out = tmp_path / "fashion", tmp_path / "runs"
    write_fashion(data_dir, n_train=60, n_test=20)
    assert vae.main(["--quick", "--variants", "weightnorm", "--seeds", "0", "--lr", "1e30",
                     "--epochs", "3", "--data-dir", str(data_dir), "--train-subset", "60",
                     "--test-subset", "20", "--batch-size", "10", "--init-examples", "10",
                     "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    folder = out / "vae-weightnorm-s0"
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["diverged"] is True and len(rows) == last["epoch"]
    assert (last["epoch"] - 1) * 6 < last["step"] <= last["epoch"] * 6  # 6 steps an epoch
    assert not math.isfinite(float(last["loss"]))
    assert f"at step {last['step']}" in (folder / "log.txt").read_text()
