"""Pictures of the demo and the fidelity evaluation (matplotlib, Agg canvas, no display needed).

* :func:`fidelity_plot`: fidelity against GFLOPs per frame, a line per attention mode (and
  policy family), with the 2x and 4x savings marked.
* :func:`token_overlay`: a frame with a heatmap of how many gates updated each token.
* :func:`update_strip`: frames with their updated-token heatmaps above the dense and eventful
  saliency maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["fidelity_plot", "hard_plot", "token_overlay", "update_strip", "heat_colors"]

_MODE_COLORS = {"exact": "tab:blue", "paper": "tab:orange", "dense": "tab:green"}
_MODE_ORDER = {"dense": 0, "paper": 1, "exact": 2}
_FAMILY_STYLES = ["-o", "--s", ":^", "-.D", "-v"]


def _figure(w: float, h: float, dpi: int = 100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def fidelity_plot(
    points: Sequence,
    path: str | Path,
    title: str = "",
    metrics: Sequence[str] = ("cosine_mean", "cc_mean"),
    families: Sequence[str] | None = None,
) -> Path:
    """Fidelity (y) against GFLOPs per frame (x): one line per attention mode and policy family.

    points: ``evtrace.tools.fidelity.FidelityPoint`` s. metrics: one panel each (panels whose metric
    is NaN everywhere are dropped). Vertical lines mark the dense cost, 2x and 4x fewer FLOPs.
    """
    path = Path(path)
    metrics = [m for m in metrics if any(not math.isnan(getattr(p, m)) for p in points)]
    fams = list(families) if families is not None else list(dict.fromkeys(p.family for p in points))
    fig = _figure(5.0 * len(metrics), 4.3)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    labels = {
        "cosine_mean": "feature cosine (mean over frames)",
        "cc_mean": "saliency CC (mean over frames)",
        "cosine_worst": "feature cosine (worst frame)",
        "cc_worst": "saliency CC (worst frame)",
    }
    dense = max((p.gflops_dense for p in points), default=1.0)
    for ax, metric in zip(axes, metrics):
        modes = sorted(dict.fromkeys(p.attention for p in points), key=lambda m: _MODE_ORDER.get(m, 0))
        for mode in modes:  # "dense" first and wide: exact draws on top of it (same fidelity, fewer FLOPs)
            for k, fam in enumerate(fams):
                sel = sorted(
                    (p for p in points if p.attention == mode and p.family == fam), key=lambda p: p.gflops
                )
                if not sel:
                    continue
                ax.plot(
                    [p.gflops for p in sel],
                    [getattr(p, metric) for p in sel],
                    _FAMILY_STYLES[k % len(_FAMILY_STYLES)],
                    color=_MODE_COLORS.get(mode),
                    markersize=6 if mode == "dense" else 4,
                    linewidth=3.0 if mode == "dense" else 1.3,
                    alpha=0.45 if mode == "dense" else 1.0,
                    label=f"{mode} attention, {fam}",
                )
        for factor, name in ((1, "dense"), (2, "2x"), (4, "4x")):
            ax.axvline(dense / factor, color="0.6", linewidth=0.8, linestyle=":")
            ax.text(
                dense / factor,
                1.0,
                f" {name}",
                transform=ax.get_xaxis_transform(),
                fontsize=7,
                va="top",
                color="0.4",
            )
        for level in (0.99, 0.97):
            ax.axhline(level, color="0.8", linewidth=0.8)
        ax.set_xlabel("GFLOPs per frame (paper convention, steady state)")
        ax.set_ylabel(labels.get(metric, metric))
        ax.grid(alpha=0.25)
    handles, names = axes[0].get_legend_handles_labels()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.savefig(path)
    return path


def heat_colors(counts: np.ndarray, vmax: float, cmap: str = "viridis") -> np.ndarray:
    """(h, w) counts -> (h, w, 4) float RGBA in [0, 1] (alpha grows with the count)."""
    from matplotlib import colormaps

    z = np.clip(counts / max(vmax, 1e-12), 0.0, 1.0)
    rgba = colormaps[cmap](z)
    rgba[..., 3] = 0.05 + 0.6 * z
    return rgba


def token_overlay(rgb: np.ndarray, counts: np.ndarray, vmax: float) -> np.ndarray:
    """A uint8 (H, W, 3) frame with the per-token update counts (h, w) blended over it
    (nearest upsampling: one block per token)."""
    h, w = rgb.shape[:2]
    gh, gw = counts.shape
    rows = np.arange(h) * gh // h
    cols = np.arange(w) * gw // w
    heat = heat_colors(counts, vmax)[rows][:, cols]
    alpha = heat[..., 3:4]
    out = rgb.astype(np.float32) / 255.0 * (1 - alpha) + heat[..., :3] * alpha
    return (out * 255).round().clip(0, 255).astype(np.uint8)


def update_strip(path: str | Path, cells: Sequence[dict], title: str, vmax: float) -> Path:
    """Columns of frames: row 1 the frame with its updated-token heatmap, row 2 the dense
    saliency map, row 3 the eventful one.

    cells: dicts with ``index`` (frame number), ``overlay``, ``dense``, ``eventful`` (uint8 RGB
    images of one size), ``updated`` (fraction of token updates, 0..1) and ``cc``.
    """
    path = Path(path)
    n = len(cells)
    h, w = cells[0]["overlay"].shape[:2]
    col = 2.0
    fig = _figure(col * n + 0.9, 3 * col * h / w + 0.9, dpi=90)
    axes = fig.subplots(3, n, squeeze=False)
    for j, c in enumerate(cells):
        axes[0, j].imshow(c["overlay"])
        axes[0, j].set_title(f"frame {c['index']}: {100 * c['updated']:.0f}% updated", fontsize=7)
        axes[1, j].imshow(c["dense"])
        axes[2, j].imshow(c["eventful"])
        axes[2, j].set_title(f"CC {c['cc']:.3f}", fontsize=7)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
    axes[0, 0].set_ylabel("updated tokens", fontsize=8)
    axes[1, 0].set_ylabel("dense saliency", fontsize=8)
    axes[2, 0].set_ylabel("eventful saliency", fontsize=8)
    fig.suptitle(title + f"  (heat: gates, of {vmax:g}, that updated the token)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def hard_plot(points: Sequence, path: str | Path, title: str = "", metric: str = "cosine_worst") -> Path:
    """The hard-video suite: ``metric`` (worst-frame cosine by default) against GFLOPs per frame,
    one panel per stream, one line per policy family; the dense cost, 2x and 4x are marked and
    the worst-frame targets (0.95 at 2x, 0.90 at 4x) drawn. points: ``HardPoint`` s."""
    path = Path(path)
    streams = list(dict.fromkeys(p.stream for p in points))
    fams = list(dict.fromkeys(p.family for p in points))
    cols = min(4, len(streams)) or 1
    rows = math.ceil(len(streams) / cols) or 1
    fig = _figure(3.6 * cols, 3.0 * rows + 0.8)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    dense = max((p.gflops_dense for p in points), default=1.0)
    for ax, stream in zip(axes, streams):
        for k, fam in enumerate(fams):
            sel = sorted(
                (p for p in points if p.stream == stream and p.family == fam), key=lambda p: p.gflops
            )
            if sel:
                ax.plot(
                    [p.gflops for p in sel],
                    [getattr(p, metric) for p in sel],
                    _FAMILY_STYLES[k % len(_FAMILY_STYLES)],
                    color=colors[k % len(colors)],
                    markersize=4,
                    linewidth=1.2,
                    label=fam,
                )
        for factor, name in ((1, "dense"), (2, "2x"), (4, "4x")):
            ax.axvline(dense / factor, color="0.6", linewidth=0.8, linestyle=":")
            ax.text(
                dense / factor, 0.02, f" {name}", transform=ax.get_xaxis_transform(), fontsize=7, color="0.4"
            )
        for level in (0.95, 0.90):
            ax.axhline(level, color="0.8", linewidth=0.8)
        ax.set_title(stream, fontsize=9)
        ax.set_xlabel("GFLOPs per frame", fontsize=8)
        ax.set_ylabel(metric.replace("_", " "), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25)
    for ax in axes[len(streams) :]:
        ax.set_visible(False)
    handles, names = axes[0].get_legend_handles_labels()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.savefig(path)
    return path
