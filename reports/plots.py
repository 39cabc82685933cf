"""What every plot of a report page shares: the error band, the colour of each method, the mark of a
collapsed run, the inline image."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from reports.tables import ci95, text_column  # noqa: E402

COLLAPSED_COLOUR = "0.45"       # the grey ring around a collapsed run's point, in every plot
COLLAPSED_LABEL = "collapsed (the tables give why)"


def t_interval(values) -> tuple[float, float]:
    """The tables' 95% t-interval of the mean, as seaborn's error band (none for one seed)."""
    mean, half = ci95(values)
    half = 0.0 if np.isnan(half) else half
    return mean - half, mean + half


def method_palette(runs: pd.DataFrame) -> dict:
    """One colour per method of the suite, the same in every plot of its page."""
    names = sorted(runs["method"].dropna().unique())
    return dict(zip(names, sns.color_palette(n_colors=len(names))))


def ring_collapsed(ax, data: pd.DataFrame, x: str, y: str) -> bool:
    """A hollow grey ring around each collapsed run's point (its index entry's `collapsed`) of `data`;
    whether there was any."""
    collapsed = data[text_column(data, "collapsed") != ""]
    if collapsed.empty:
        return False
    ax.scatter(collapsed[x], collapsed[y], s=120, facecolors="none", edgecolors=COLLAPSED_COLOUR, linewidths=1.5,
               zorder=4, label=COLLAPSED_LABEL)
    return True


def img_tag(path: Path) -> str:
    """The PNG inline, so that a page is one self-contained file."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'
