"""The drop-in path under the training frameworks users run it in (small models, CPU).

- Lightning: a ``LightningModule`` holding a weight-normalized model (data init in
  ``on_fit_start``) trains exactly as the plain loop with the same optimizer does, and its
  checkpoint loads into a fresh module with the same outputs; bf16-mixed precision trains.
- transformers' ``Trainer``: a weight-normalized Wav2Vec2 classifier (its own weight norm
  adopted) stopped at a checkpoint and resumed ends where the uninterrupted run ends.
- peft: LoRA adapters on weight-normalized Linears train with g and v frozen, and
  ``merge_and_unload`` leaves layers with the adapted outputs (the merged weight is split
  back into g and v).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import wnorm
from nets import mean_only_convnet

pytestmark = pytest.mark.slow


def data(n: int = 32) -> TensorDataset:
    gen = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(n, 3, 6, 6, generator=gen),
                         torch.randint(0, 4, (n,), generator=gen))


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return wnorm.apply(mean_only_convnet(6, 4))


# --------------------------------------------------------------------------- Lightning
def _lightning_module():
    L = pytest.importorskip("lightning")

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = convnet()

        def on_fit_start(self) -> None:
            wnorm.data_init(self.net, data().tensors[0][:16])

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    return L, Classifier


def _trainer(L, tmp_path: Path, **kw):
    kw.setdefault("max_epochs", 2)
    return L.Trainer(accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, default_root_dir=tmp_path, **kw)


def test_lightning_trains_as_the_plain_loop_and_its_checkpoint_loads_the_same_model(
        tmp_path: Path) -> None:
    L, Classifier = _lightning_module()
    module = Classifier()
    trainer = _trainer(L, tmp_path)
    trainer.fit(module, DataLoader(data(), batch_size=8))

    net = convnet()  # the same steps by hand
    wnorm.data_init(net, data().tensors[0][:16])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(2):
        for x, y in DataLoader(data(), batch_size=8):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    start = dict(convnet().named_parameters())
    got = dict(module.net.named_parameters())
    assert any(not torch.equal(got[k], start[k]) for k in start)  # it trained
    for k, p in net.named_parameters():
        torch.testing.assert_close(got[k], p, rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")

    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    loaded = Classifier.load_from_checkpoint(path)
    x = data(8).tensors[0]
    assert torch.equal(loaded.net.eval()(x), module.net.eval()(x))


def test_lightning_bf16_mixed_trains_the_weight_normalized_model(tmp_path: Path) -> None:
    L, Classifier = _lightning_module()
    module = Classifier()
    before = {k: p.detach().clone() for k, p in module.net.named_parameters()}
    _trainer(L, tmp_path, precision="bf16-mixed", max_epochs=1).fit(
        module, DataLoader(data(), batch_size=8))
    for k, p in module.net.named_parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), k
        if k.endswith("weight_v"):
            assert not torch.equal(p, before[k]), k


# --------------------------------------------------------------------------- transformers
def _wav2vec2_classifier():
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer needs it
    torch.manual_seed(0)
    cfg = tf.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=37, conv_dim=(16, 16), conv_stride=(5, 2),
                            conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=2, num_labels=3, hidden_dropout=0.0,
                            activation_dropout=0.0, attention_dropout=0.0,
                            feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
                            mask_time_prob=0.0)
    model = tf.Wav2Vec2ForSequenceClassification(cfg)
    wnorm.apply(model)  # adopts pos_conv_embed's weight norm, normalizes the rest
    return tf, model


class _Audio(torch.utils.data.Dataset):
    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(3)
        self.x = torch.randn(12, 400, generator=gen)
        self.y = torch.randint(0, 3, (12,), generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_values": self.x[i], "labels": self.y[i]}


def test_transformers_trainer_resumes_a_weight_normalized_model_where_it_stopped(
        tmp_path: Path) -> None:
    tf, _ = _wav2vec2_classifier()

    def run(out: Path, steps: int, resume: str | None = None) -> nn.Module:
        _, model = _wav2vec2_classifier()
        args = tf.TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=2,
                                    per_device_train_batch_size=3, learning_rate=1e-3,
                                    report_to=[], use_cpu=True, seed=0, logging_strategy="no",
                                    disable_tqdm=True, dataloader_num_workers=0)
        tf.Trainer(model=model, args=args, train_dataset=_Audio()).train(
            resume_from_checkpoint=resume)
        return model

    whole = run(tmp_path / "whole", 4)  # saves checkpoint-2 on its way
    resumed = run(tmp_path / "resumed", 4, resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert any(k.endswith("weight_g") for k, _ in whole.named_parameters())
    start = dict(_wav2vec2_classifier()[1].named_parameters())
    got = dict(resumed.named_parameters())
    assert any(not torch.equal(got[k], start[k]) for k in start)  # it trained
    for k, p in whole.named_parameters():
        torch.testing.assert_close(got[k], p, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------- peft
def test_lora_on_weight_normalized_layers_trains_and_merges_into_g_and_v() -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = wnorm.apply(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))
    frozen = {k: p.detach().clone() for k, p in net.named_parameters()}
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    base = net(x).detach()
    model = peft.get_peft_model(net, peft.LoraConfig(target_modules=["0", "2"], r=2,
                                                     lora_alpha=4))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    for k, p in model.base_model.model.named_parameters():
        if "lora_" not in k:  # g, v and biases are the frozen base model's
            assert torch.equal(p, frozen[k.replace(".base_layer", "")]), k
    adapted = model(x).detach()
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapters learned something
    for safe in (False, True):
        merged = copy.deepcopy(model).merge_and_unload(safe_merge=safe)
        assert wnorm.is_weight_normalized(merged[0]) and wnorm.is_weight_normalized(merged[2])
        assert not any("lora" in k for k, _ in merged.named_parameters())
        torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-6)


def test_dora_on_weight_normalized_layers_merges_safely_into_g_and_v() -> None:
    # the safe merge writes a fresh weight into the latest read; the unsafe one writes into a
    # weight read before another read, which is not watched (a documented limit)
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = wnorm.apply(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))
    x = torch.randn(16, 6)
    with torch.no_grad():
        base = net(x)
    model = peft.get_peft_model(net, peft.LoraConfig(target_modules=["0", "2"], r=2,
                                                     use_dora=True))
    with torch.no_grad():
        for k, p in model.named_parameters():
            if "lora_B" in k:
                p.normal_(0, 0.3)
        adapted = model(x)
    assert not torch.allclose(adapted, base, atol=1e-2)
    merged = copy.deepcopy(model).merge_and_unload(safe_merge=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-6)
