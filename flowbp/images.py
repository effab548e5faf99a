"""Image grids and training curves as PNG files (PIL and matplotlib; no torchvision)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def image_grid(images: torch.Tensor, rows: int, upscale: int = 4, pad: int = 1) -> np.ndarray:
    """B×3×H×W in [0, 1] -> an H'×W'×3 uint8 array, ``rows`` rows, nearest-neighbour upscaled."""
    imgs = images.detach().float().clamp(0, 1).cpu()
    b, _, h, w = imgs.shape
    cols = -(-b // rows)
    imgs = imgs.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
    h, w = h * upscale, w * upscale
    canvas = torch.ones(3, rows * (h + pad) + pad, cols * (w + pad) + pad) * 0.5
    for k in range(b):
        r, c = divmod(k, cols)
        canvas[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = imgs[
            k
        ]
    return (canvas.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def save_grid(images: torch.Tensor, path: str | Path, rows: int, upscale: int = 4) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, rows, upscale)).save(path)
    return path


def plot_curves(
    path: str | Path, steps: Sequence[int], curves: dict[str, Sequence[float]], title: str, smooth: int = 10
) -> Path:
    """One panel per curve: the raw values faint, a moving average of ``smooth`` steps on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], curves.items(), strict=True):
        v = np.asarray(values, dtype=float)
        ax.plot(steps, v, alpha=0.3, color="C0")
        if len(v) >= smooth:
            kernel = np.ones(smooth) / smooth
            ax.plot(steps[smooth - 1 :], np.convolve(v, kernel, mode="valid"), color="C0", label=f"mean of {smooth}")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
