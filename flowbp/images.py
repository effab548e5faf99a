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


def save_grid(
    images: torch.Tensor,
    path: str | Path,
    rows: int,
    upscale: int = 4,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    caption: str | None = None,
) -> Path:
    """Write a grid PNG; with ``row_labels`` / ``col_labels`` / ``caption`` the :func:`labelled_grid`."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if row_labels is None and col_labels is None and caption is None:
        Image.fromarray(image_grid(images, rows, upscale)).save(path)
    else:
        labelled_grid(images, rows, row_labels, col_labels, caption).save(path)
    return path


#: Side of one grid cell in pixels: small images are enlarged (pixels stay visible), large ones reduced.
CELL_MIN, CELL_MAX = 128, 256
LABEL_WIDTH = 220  # the prompt column
_FONT_SIZE = 13


def _font(size: int = _FONT_SIZE):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font where Pillow has FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels in at most ``max_lines`` lines; the rest ends in an ellipsis."""
    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words and lines:
        lines[-1] += " " + " ".join(words)
    if lines:
        lines[-1] = _fit(draw, lines[-1], font, width)
    return [_fit(draw, line, font, width) for line in lines]


def labelled_grid(
    images: torch.Tensor | Sequence[torch.Tensor],
    rows: int,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    caption: str | None = None,
):
    """A PIL image: a caption line on top, column labels, then one row per prompt with its label on the left.

    ``images``: B×3×H×W floats in [0, 1] or a sequence of 3×H×W uint8 (what ``flowbp eval`` keeps), in
    row-major order (B = rows × columns). Every cell is ``CELL_MIN``..``CELL_MAX`` pixels wide:
    16-pixel digits are enlarged with visible pixels, 1024-pixel images reduced smoothly.
    """
    from PIL import Image, ImageDraw

    if isinstance(images, torch.Tensor):
        arrays = [(img.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8) for img in images.cpu()]
    else:
        arrays = [img.detach().cpu() for img in images]
    if not arrays or len(arrays) % rows:
        raise ValueError(f"labelled_grid: {len(arrays)} images do not fill {rows} rows")
    cols = len(arrays) // rows
    h, w = int(arrays[0].shape[1]), int(arrays[0].shape[2])
    side = max(h, w)
    if side < CELL_MIN:
        scale, resample = -(-CELL_MIN // side), Image.Resampling.NEAREST
    else:
        scale, resample = min(1.0, CELL_MAX / side), Image.Resampling.LANCZOS
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    font = _font()
    line_h = _FONT_SIZE + 4
    pad = 4
    label_w = LABEL_WIDTH if row_labels is not None else 0
    top = (2 * line_h + pad if caption else 0) + (line_h + pad if col_labels is not None else 0)
    width = label_w + cols * (cw + pad) + pad
    canvas = Image.new("RGB", (width, top + rows * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    if caption:
        for line in _wrap(draw, caption, font, width - 2 * pad, 2):
            draw.text((pad, y), line, fill="black", font=font)
            y += line_h
        y = 2 * line_h + pad
    if col_labels is not None:
        for c, label in enumerate(col_labels):
            text = _wrap(draw, str(label), font, cw, 1)
            draw.text((label_w + pad + c * (cw + pad), y), text[0] if text else "", fill="#444", font=font)
    for k, img in enumerate(arrays):
        r, c = divmod(k, cols)
        tile = Image.fromarray(img.permute(1, 2, 0).numpy())
        if (tile.width, tile.height) != (cw, ch):
            tile = tile.resize((cw, ch), resample)
        canvas.paste(tile, (label_w + pad + c * (cw + pad), top + pad + r * (ch + pad)))
    if row_labels is not None:
        max_lines = max(1, ch // line_h)
        for r, label in enumerate(row_labels[:rows]):
            for n, line in enumerate(_wrap(draw, str(label), font, label_w - 2 * pad, max_lines)):
                draw.text((pad, top + pad + r * (ch + pad) + n * line_h), line, fill="black", font=font)
    return canvas


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
