r"""The effective learning rate of weight normalization: :math:`\lVert v\rVert` grows, unless v is
projected back onto its sphere after every step.

Under plain SGD the gradient of :math:`w = g\,v/\lVert v\rVert` with respect to v is orthogonal
to v (Salimans & Kingma 2016, section 2.1), so every step grows the norm,
:math:`\lVert v'\rVert^2 = \lVert v\rVert^2 + \lVert\Delta v\rVert^2`, and the direction
:math:`v/\lVert v\rVert` turns by :math:`\Delta v_\perp/\lVert v\rVert`, a step on v scaled by
:math:`g/\lVert v\rVert^2`: the
effective learning rate of the direction, :math:`\eta\,g/\lVert v\rVert^2`, decays as the norm
grows. ``projected`` runs the same network with :func:`wnorm.sphere.project_after_step`
(``radius="initial"``, NaP): each row of v is put back at its starting norm after every step, so
the norm is flat and the decay is gone. Same data, init, batches and learning rates; only the
projection differs.

Run (from the repository root; a few minutes on 2 CPU cores, the committed log.txt says how long
it took; writes results/norm_growth/)::

    python -m experiments.norm_growth
    python -m experiments.norm_growth --lrs 0.03,0.3,3 --epochs 10 --out runs/ng   # another
    python -m experiments.norm_growth --report-only --out results/norm_growth      # redraw

The folder gets ``config.json`` (the options, the data used, the code version), ``log.txt``,
``metrics.jsonl`` and, generated from it, ``norm_growth.png`` and ``summary.md``. Its lines:
``"type": "start"`` (after the data-dependent init), ``"type": "step"`` (after each of the first
``--log-every`` steps, then every ``--log-every`` steps) with, per layer, the mean over its units
of :math:`\lVert v\rVert`, of :math:`\eta\,g/\lVert v\rVert^2` and of the angle (radians) the
step turned the weight rows by; ``"type": "epoch"`` with the mean training loss and the test
error, or ``"diverged": true`` where a loss or weight stopped being finite (the run stops there).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# the repository's wnorm, whatever is installed: the run records this checkout's commit
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wnorm  # noqa: E402
from wnorm import WnormError  # noqa: E402
from wnorm.sphere import project_after_step  # noqa: E402

# --------------------------------------------------------------------------- defaults
VARIANTS = ("weightnorm", "projected")


@dataclass
class Config:
    """The committed run's settings: one block, every field a ``--flag``."""

    out: str = "results/norm_growth"
    data_dir: str | None = None  # default: /usr/share/datasets/fashion-mnist, then the cache
    train_subset: int = 10000  # fixed random draws of Fashion-MNIST
    test_subset: int = 2000
    width: int = 256  # 784-256-256-10 ReLU MLP, every Linear weight-normalized
    depth: int = 2
    lrs: str = "0.01,0.03,0.1"  # plain SGD (no momentum: the section-2 derivation's setting)
    epochs: int = 4
    batch_size: int = 100
    init_examples: int = 500  # the paper's data-dependent init, the same for both variants
    seed: int = 0
    log_every: int = 10  # steps between "step" lines (every one of the first log_every)
    threads: int = 2
    overwrite: bool = False


# --------------------------------------------------------------------------- the run
def mlp(cfg: Config) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 28 * 28
    for _ in range(cfg.depth):
        layers += [nn.Linear(width, cfg.width), nn.ReLU()]
        width = cfg.width
    layers.append(nn.Linear(width, 10))
    return wnorm.apply(nn.Sequential(*layers))


def layer_stats(net: nn.Module, lr: float, before: dict[str, Tensor] | None
                ) -> dict[str, dict[str, float]]:
    """Per weight-normalized layer: mean over units of ||v||, lr g/||v||^2 and (given the
    weights before the step) the angle each row turned by."""
    out = {}
    with torch.no_grad():
        for name, m in net.named_modules():
            if not wnorm.is_weight_normalized(m, "weight"):
                continue
            vn = m.weight_v.norm(dim=1)
            row = {"v_norm": vn.mean().item(),
                   "eff_lr": (lr * m.weight_g.flatten().abs() / vn.pow(2)).mean().item()}
            if before is not None:
                w0, w1 = before[name], m.weight
                cos = (w0 * w1).sum(1) / (w0.norm(dim=1) * w1.norm(dim=1))
                row["angle"] = torch.arccos(cos.clamp(-1.0, 1.0)).mean().item()
            out[name] = row
    return out


def weights(net: nn.Module) -> dict[str, Tensor]:
    return {n: m.weight.detach().clone() for n, m in net.named_modules()
            if wnorm.is_weight_normalized(m, "weight")}


def train(cfg: Config, variant: str, lr: float, data: Any, log: Any, metrics: Any) -> None:
    torch.manual_seed(cfg.seed)
    net = mlp(cfg)
    x, y = data.x_train, data.y_train
    order = torch.Generator().manual_seed(cfg.seed)
    wnorm.data_init(net, x[torch.randperm(len(x), generator=order)[:cfg.init_examples]])
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    if variant == "projected":
        project_after_step(opt, net, radius="initial")
    metrics.write(json.dumps({"type": "start", "variant": variant, "lr": lr,
                              "layers": layer_stats(net, lr, None)}) + "\n")
    steps = len(x) // cfg.batch_size
    step, t0 = 0, time.perf_counter()
    for epoch in range(cfg.epochs):
        net.train()
        perm = torch.randperm(len(x), generator=order)
        total = 0.0
        for i in range(steps):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            logged = step < cfg.log_every or step % cfg.log_every == 0  # early steps: all
            before = weights(net) if logged else None
            opt.zero_grad()
            loss = F.cross_entropy(net(x[idx]), y[idx])
            if math.isfinite(loss.item()):
                loss.backward()
                opt.step()
                total += loss.item()
                stats = layer_stats(net, lr, before) if logged else {}
            if not (math.isfinite(loss.item()) and all(
                    math.isfinite(x) for st in stats.values() for x in st.values())):
                # stop here and say so: no NaN curves, no NaN in metrics.jsonl
                metrics.write(json.dumps({"type": "epoch", "variant": variant, "lr": lr,
                                          "epoch": epoch + 1, "step": step, "diverged": True})
                              + "\n")
                log(f"{variant:>10} lr {lr:g}: diverged (loss or weights not finite) at step "
                    f"{step}")
                return
            if logged:
                metrics.write(json.dumps({"type": "step", "variant": variant, "lr": lr,
                                          "step": step, "epoch": epoch,
                                          "train_loss": loss.item(), "layers": stats}) + "\n")
            step += 1
        net.eval()
        with torch.no_grad():
            err = (net(data.x_test).argmax(1) != data.y_test).float().mean().item()
        row = {"type": "epoch", "variant": variant, "lr": lr, "epoch": epoch + 1, "step": step,
               "diverged": False, "train_loss": total / steps, "test_error": err,
               "seconds": round(time.perf_counter() - t0, 2)}
        metrics.write(json.dumps(row) + "\n")
        v = layer_stats(net, lr, None)
        log(f"{variant:>10} lr {lr:g} epoch {epoch + 1}: train loss {row['train_loss']:.4f}, "
            f"test error {err:.4f}, mean ||v|| "
            + ", ".join(f"{k}: {s['v_norm']:.3g}" for k, s in v.items()))


def version() -> dict[str, Any]:
    from experiments.common import version_info

    return version_info("cpu")


# --------------------------------------------------------------------------- report
def read(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"norm_growth: {path} does not exist; run the experiment first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report(folder: Path) -> str:
    """Write ``norm_growth.png`` and ``summary.md`` from ``metrics.jsonl``; return the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read(folder)
    runs = sorted({(r["variant"], r["lr"]) for r in rows}, key=lambda k: (k[1], k[0]))
    steps = {k: [r for r in rows if r["type"] == "step" and (r["variant"], r["lr"]) == k]
             for k in runs}
    epochs = {k: [r for r in rows if r["type"] == "epoch" and (r["variant"], r["lr"]) == k]
              for k in runs}
    start = {(r["variant"], r["lr"]): r for r in rows if r["type"] == "start"}

    def mean_over_layers(r: dict[str, Any], key: str) -> float:
        vals = [s[key] for s in r["layers"].values() if key in s]
        return sum(vals) / len(vals)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"weightnorm": "-", "projected": "--"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lrs = sorted({lr for _, lr in runs})
    for (variant, lr) in runs:
        c, ls = colors[lrs.index(lr) % len(colors)], styles.get(variant, ":")
        label = f"{variant}, lr {lr:g}"
        s = steps[(variant, lr)]
        x = [r["step"] + 1 for r in s]  # steps taken
        v0 = {k: st["v_norm"] for k, st in start[(variant, lr)]["layers"].items()}
        growth = [sum(st["v_norm"] / v0[k] for k, st in r["layers"].items()) / len(v0) for r in s]
        axes[0].plot(x, growth, ls, color=c, label=label)
        axes[1].plot(x, [mean_over_layers(r, "angle") for r in s], ls, color=c, label=label)
        e = [r for r in epochs[(variant, lr)] if not r["diverged"]]
        gone = [r for r in epochs[(variant, lr)] if r["diverged"]]
        if gone:
            label += f" (diverged at step {gone[0]['step']})"
        axes[2].plot([r["epoch"] for r in e], [100 * r["test_error"] for r in e], ls, color=c,
                     marker="o", label=label)
    axes[0].set(title="||v|| / ||v|| at the start (mean over units and layers)",
                xlabel="steps taken",
                xscale="log", yscale="log")
    axes[1].set(title="angle a step turns the weight rows (rad, mean)", xlabel="steps taken",
                xscale="log", yscale="log")
    axes[2].set(title="test error (%)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "norm_growth.png", dpi=110)
    plt.close(fig)

    lines = ["# ‖v‖ growth and the effective learning rate", "",
             f"Generated by `python -m experiments.norm_growth --report-only --out {folder}` "
             "from metrics.jsonl.", "",
             "| variant | lr | mean ‖v‖ end / start | lr g/‖v‖² end / start | "
             "rotation per step, last 10% / first 10% of steps | final test error (%) |",
             "|---|---|---|---|---|---|"]
    for k in runs:
        s, e = steps[k], epochs[k]
        first, last = start[k], s[-1]
        growth = mean_over_layers(last, "v_norm") / mean_over_layers(first, "v_norm")
        eff = mean_over_layers(last, "eff_lr") / mean_over_layers(first, "eff_lr")
        n = max(1, len(s) // 10)
        rot = (sum(mean_over_layers(r, "angle") for r in s[-n:])
               / sum(mean_over_layers(r, "angle") for r in s[:n]))
        end = (f"diverged at step {e[-1]['step']}" if e[-1]["diverged"]
               else f"{100 * e[-1]['test_error']:.2f}")
        upto = f" (to step {last['step']})" if e[-1]["diverged"] else ""
        lines.append(f"| {k[0]} | {k[1]:g} | {growth:.3g}{upto} | {eff:.3g} | {rot:.3g} | "
                     f"{end} |")
    text = "\n".join(lines) + "\n"
    (folder / "summary.md").write_text(text)
    return text


# --------------------------------------------------------------------------- command line
def parse(argv: list[str] | None) -> tuple[Config, list[float], bool]:
    p = argparse.ArgumentParser(prog="python -m experiments.norm_growth",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=f"(default: {f.default})")
        else:
            kind = {"int": int, "str": str}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=f.default, help=f"(default: {f.default})")
    p.add_argument("--report-only", action="store_true",
                   help="redraw the plot and summary from an existing --out folder")
    a = p.parse_args(argv)
    cfg = Config(**{f.name: getattr(a, f.name) for f in fields(Config)})
    for name in ("train_subset", "test_subset", "width", "depth", "epochs", "batch_size",
                 "init_examples", "log_every", "threads"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be an integer >= 1; got "
                    f"{getattr(cfg, name)}")
    try:
        lrs = [float(s) for s in cfg.lrs.split(",") if s.strip()]
    except ValueError:
        p.error(f"--lrs takes comma-separated numbers; got {cfg.lrs!r}")
    if not lrs or not all(0 < lr < math.inf for lr in lrs) or len(set(lrs)) != len(lrs):
        p.error(f"--lrs takes distinct finite numbers > 0; got {cfg.lrs!r}")
    if cfg.batch_size > cfg.train_subset:
        p.error(f"--batch-size {cfg.batch_size} is larger than --train-subset "
                f"{cfg.train_subset}")
    return cfg, lrs, a.report_only


def main(argv: list[str] | None = None) -> Path:
    cfg, lrs, report_only = parse(argv)
    folder = Path(cfg.out)
    if report_only:
        print(report(folder), end="")
        return folder
    from experiments.common import check_out
    from experiments.data import load_fashion_mnist

    try:
        check_out(folder, "the run")
    except WnormError as e:
        raise SystemExit(f"norm_growth: {e}") from None
    if (folder / "metrics.jsonl").exists() and not cfg.overwrite:
        raise SystemExit(f"norm_growth: {folder} already holds a run; pass --overwrite to "
                         "replace it, or another --out")
    torch.set_num_threads(cfg.threads)
    try:  # a missing or corrupt data file: one line, as every other entry point says it
        data = load_fashion_mnist(cfg.data_dir, train_subset=cfg.train_subset,
                                  test_subset=cfg.test_subset, subset_seed=cfg.seed)
    except WnormError as e:
        raise SystemExit(f"norm_growth: {e}") from None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(
        {"kind": "norm-growth", "config": asdict(cfg), "lrs": lrs, "variants": list(VARIANTS),
         "data": data.describe(), "version": version()}, indent=2) + "\n")
    with (folder / "log.txt").open("w") as logf, (folder / "metrics.jsonl").open("w") as metrics:
        def log(msg: str) -> None:
            print(msg)
            logf.write(msg + "\n")
            logf.flush()

        log(f"norm_growth: {data.describe()}; {len(lrs)} learning rates x {list(VARIANTS)}")
        t0 = time.perf_counter()
        for lr in lrs:
            for variant in VARIANTS:
                train(cfg, variant, lr, data, log, metrics)
        log(f"done in {time.perf_counter() - t0:.1f} s")
    print(report(folder), end="")
    return folder


if __name__ == "__main__":
    from experiments.common import entry_point

    entry_point(main)
