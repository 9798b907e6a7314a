"""Which digits teacher is best for a fixed CPU wall-clock budget: MLP or U-Net?

Each candidate is trained on scikit-learn's digits for about the same wall time (the number of
iterations is set from a timed 20-step probe), then samples ``--n-samples`` digits with 100-step
uniform Euler from its EMA weights. An oracle independent of the models scores them:

- an sklearn ``MLPClassifier`` trained on 70% of the real digits (its held-out accuracy is
  printed), giving (a) the mean max class probability of the samples, (b) their class histogram
  (ideally uniform; we print the max/min class count ratio and the total-variation distance to
  uniform), and (c) the Frechet distance between real digits and samples in the classifier's
  hidden-layer feature space ("FD-clf") and in a 16-d PCA space fitted on the real digits;
- the same scores for the held-out real digits, as a floor.

Usage (the run that picked the default, about 10 minutes on 2 cores):
    .venv/bin/python bench/teacher_quality.py --candidates mlp,mlp_small,unet,unet_small \
        --budget 120 --out /tmp/tq/teacher_quality.png
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from sklearn.decomposition import PCA
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boss_core.data import load_digits_images  # noqa: E402
from boss_core.grids import uniform_grid  # noqa: E402
from boss_core.models import ModelConfig, build_model, count_parameters  # noqa: E402
from boss_core.sampling import euler_sample  # noqa: E402
from boss_core.seeds import sample_noise  # noqa: E402
from boss_core.teacher import TeacherConfig, train_teacher  # noqa: E402

CANDIDATES = {
    "default": ModelConfig(),  # whatever boss_core.models.ModelConfig defaults to
    "mlp": ModelConfig(arch="mlp", hidden=512, depth=4),
    "mlp_small": ModelConfig(arch="mlp", hidden=256, depth=3),
    "unet": ModelConfig(arch="unet", base_channels=32, channel_mults=(1, 2)),
    "unet_small": ModelConfig(arch="unet", base_channels=16, channel_mults=(1, 2)),
}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) for feature rows a (n, d), b (m, d).

    tr (S_a S_b)^(1/2) = sum sqrt(eig(R S_b R)) with R = S_a^(1/2) (symmetric PSD, so eigh is
    stable even when dead ReLU units make a covariance singular).
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S_a^(1/2)
    eig = linalg.eigvalsh(root_a @ cov_b @ root_a)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)


class Oracle:
    """Digit classifier on flattened [-1, 1] pixels, plus PCA, fitted on real digits only."""

    def __init__(self, x: np.ndarray, y: np.ndarray, seed: int = 0):
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, test_size=0.3, random_state=seed, stratify=y)
        self.clf = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=1000,
                                 random_state=seed).fit(x_tr, y_tr)
        self.accuracy = float(self.clf.score(x_te, y_te))
        self.pca = PCA(n_components=16, random_state=seed).fit(x)
        self.real, self.held_out = x, x_te
        self.real_feat = self.features(x)

    def features(self, x: np.ndarray) -> np.ndarray:
        """Hidden ReLU layer of the classifier: (n, 128)."""
        return np.maximum(x @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0.0)

    def score(self, x: np.ndarray) -> dict[str, float]:
        prob = self.clf.predict_proba(x)
        counts = np.bincount(prob.argmax(1), minlength=10)
        freq = counts / counts.sum()
        return {
            "max_prob": float(prob.max(1).mean()),
            "hist": counts.tolist(),
            "max_min": float(counts.max() / max(counts.min(), 1)),
            "tv_uniform": float(0.5 * np.abs(freq - 0.1).sum()),
            "fd_clf": frechet_distance(self.real_feat, self.features(x)),
            "fd_pca": frechet_distance(self.pca.transform(self.real), self.pca.transform(x)),
        }


def save_grid(images: torch.Tensor, path: Path, rows: int = 10, scale: int = 4) -> None:
    """(n, 1, 8, 8) images in [-1, 1] -> a rows x rows PNG grid, upscaled by ``scale``."""
    imgs = images[: rows * rows, 0].clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    h, w = imgs.shape[-2:]
    grid = np.full((rows * (h + 1) + 1, rows * (w + 1) + 1), 255, dtype=np.uint8)
    for i, img in enumerate(imgs.numpy()):
        r, c = divmod(i, rows)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = img
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                 Image.Resampling.NEAREST).save(path)


def time_per_step(model_config: ModelConfig, x: torch.Tensor, base: TeacherConfig) -> float:
    """Median seconds per training step over steps 10..60 of a throwaway run."""
    stamps: list[float] = []
    probe = build_model(model_config, tuple(x.shape[1:]), seed=0)
    train_teacher(probe, x, replace(base, iterations=60, log_every=10),
                  callback=lambda _: stamps.append(time.perf_counter()))
    return float(np.median(np.diff(stamps))) / 10


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", default="mlp,unet",
                        help=f"comma-separated subset of {list(CANDIDATES)}")
    parser.add_argument("--budget", type=float, default=120.0,
                        help="training wall-clock seconds per candidate")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100, help="Euler steps for sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/teacher_quality.png",
                        help="PNG path; one grid per candidate is written as <stem>_<name>.png")
    args = parser.parse_args(argv)

    print(f"hardware: {platform.processor() or platform.machine()}, os.cpu_count()="
          f"{os.cpu_count()}, torch threads={torch.get_num_threads()}, torch {torch.__version__}")
    x, y = load_digits_images()
    flat = x.reshape(len(x), -1).numpy()  # (1797, 64)
    oracle = Oracle(flat, y.numpy(), seed=args.seed)
    print(f"oracle: MLPClassifier(128) held-out accuracy {oracle.accuracy:.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = TeacherConfig(batch_size=args.batch_size, lr=args.lr, seed=args.seed, device="cpu",
                         progress=False)
    rows = [("real held-out", 0, 0, 0.0, float("nan"), oracle.score(oracle.held_out))]
    for name in args.candidates.split(","):
        model_config = CANDIDATES[name]
        probe_time = time_per_step(model_config, x, base)
        iterations = max(100, int(args.budget / probe_time))
        model = build_model(model_config, (1, 8, 8), seed=args.seed)
        result = train_teacher(model, x, replace(base, iterations=iterations, progress=True))
        noise = sample_noise((1, 8, 8), seed=args.seed + 1, start=0, count=args.n_samples)
        started = time.perf_counter()
        samples = euler_sample(result.ema_model, noise, uniform_grid(args.steps))
        sample_s = time.perf_counter() - started
        save_grid(samples, out.with_name(f"{out.stem}_{name}{out.suffix}"))
        score = oracle.score(samples.clamp(-1, 1).reshape(args.n_samples, -1).numpy())
        final_loss = float(result.losses[-200:, 1].mean())
        print(f"{name}: {iterations} it, train {result.wall_time_s:.1f} s, sample "
              f"{sample_s:.1f} s, final loss {final_loss:.4f}")
        rows.append((name, count_parameters(model), iterations, result.wall_time_s,
                     final_loss, score))

    print(f"\n{args.n_samples} samples, {args.steps}-step Euler, EMA weights, batch "
          f"{args.batch_size}, lr {args.lr}, seed {args.seed}")
    header = (f"{'model':<14}{'params':>9}{'iters':>7}{'train s':>9}{'loss':>8}"
              f"{'max p':>7}{'max/min':>8}{'TV':>6}{'FD-clf':>8}{'FD-pca':>8}  class histogram")
    print(header)
    for name, params, iters, wall, loss, s in rows:
        print(f"{name:<14}{params:>9}{iters:>7}{wall:>9.1f}{loss:>8.4f}{s['max_prob']:>7.3f}"
              f"{s['max_min']:>8.2f}{s['tv_uniform']:>6.3f}{s['fd_clf']:>8.2f}{s['fd_pca']:>8.2f}"
              f"  {s['hist']}")


if __name__ == "__main__":
    main()
