"""How a barrier record looks: loss and accuracy along the path, with their chords (`stardomain barrier
--plot`, `sd.Barrier.plot`). Reads only the record of `barriers.measure`; computes nothing but the chords."""

from __future__ import annotations

import io

from ..barriers import barriers
from ..checkpoint import atomic_write_bytes
from ..permute.variants import in_words


def plot(rec: dict, out=None, title: str | None = None) -> bytes:
    """PNG of loss and accuracy against t (train solid, test dashed, chords dotted). Written atomically
    to `out` when given; the PNG bytes are returned either way."""
    from matplotlib.figure import Figure  # the object API: never switches a notebook's backend

    ts = rec["t"]
    b = rec.get("barrier") or barriers(rec)
    fig = Figure(figsize=(10, 4), dpi=110)
    axes = fig.subplots(1, 2)
    colors = {"train": "tab:blue", "test": "tab:orange"}
    for ax, metric, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "acc", "accuracy")):
        for s in ("train", "test"):
            ys = rec[s][metric]
            ax.plot(ts, ys, "-" if s == "train" else "--", marker="o", ms=4, color=colors[s],
                    label=f"{s}  barrier {b[f'{s}_{metric}']:.4g}")
            y0, y1 = ys[ts.index(0.0)], ys[ts.index(1.0)]
            ax.plot([0, 1], [y0, y1], ":", color=colors[s], lw=1)
        ax.set_xlabel("t   (0 = A, 1 = B)")
        ax.set_ylabel(label)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="dotted: chord" if metric == "loss" else "barrier = drop below chord",
                  title_fontsize=8)
    al = rec.get("alignment") or {}
    how = in_words(al.get("variant", "full") if al.get("aligned") else "none")
    fig.suptitle(title or f"interpolation A→B ({how}, "
                 f"{rec.get('data', '')})", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": "stardomain barrier"})  # see checkpoint.check_output
    png = buf.getvalue()
    if out is not None:
        atomic_write_bytes(out, png)
    return png
