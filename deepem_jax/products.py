"""DEM products from EM cubes (channels-last: EM has shape (..., n_T), cm^-5 per log T bin)
and the DeepEM Figure-1 layout.

EM may be given as a Quantity (converted to cm^-5) or a plain array taken to be in cm^-5.
Pixels with zero or non-finite total EM get NaN mean temperatures (never a silent zero).
"""

from collections.abc import Sequence

import astropy.units as u
import numpy as np

from ._atomic import save_figure
from ._units import to_value

__all__ = ["em_at_logt", "em_in_range", "figure1", "mean_logt", "total_em"]

_EM = u.cm**-5


def _em(em) -> np.ndarray:
    return to_value(em, _EM, "em", allow_plain=True)


def _grid(logt, n: int) -> np.ndarray:
    lt = np.asarray(logt, dtype=float)
    if lt.shape != (n,):
        raise ValueError(f"logt has {lt.size} values but the EM cube has {n} temperature bins")
    return lt


def total_em(em) -> u.Quantity:
    """Total EM over all temperature bins (cm^-5), shape (...)."""
    return _em(em).sum(axis=-1) * _EM


def em_in_range(em, logt: Sequence[float], logt_min: float, logt_max: float) -> u.Quantity:
    """EM summed over bins with ``logt_min <= log T <= logt_max`` (cm^-5), shape (...)."""
    e = _em(em)
    lt = _grid(logt, e.shape[-1])
    if logt_min > logt_max:
        raise ValueError(f"empty range: logt_min {logt_min} > logt_max {logt_max}")
    sel = (lt >= logt_min - 1e-9) & (lt <= logt_max + 1e-9)
    if not sel.any():
        raise ValueError(f"no bin of the grid {lt[0]:.2f}..{lt[-1]:.2f} lies in the range")
    return e[..., sel].sum(axis=-1) * _EM


def mean_logt(em, logt: Sequence[float]) -> np.ndarray:
    """EM-weighted mean log10(T / K), shape (...); NaN where the total EM is not positive."""
    e = _em(em)
    lt = _grid(logt, e.shape[-1])
    tot = e.sum(axis=-1)
    ok = np.isfinite(tot) & (tot > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, (e * lt).sum(axis=-1) / np.where(ok, tot, 1.0), np.nan)


def em_at_logt(em, logt: Sequence[float], value: float) -> u.Quantity:
    """The EM map of the bin at ``value`` (must be a grid point to within 1e-3), cm^-5."""
    e = _em(em)
    lt = _grid(logt, e.shape[-1])
    i = int(np.argmin(np.abs(lt - value)))
    if abs(lt[i] - value) > 1e-3:
        raise ValueError(f"log T {value} is not on the grid {np.round(lt, 3).tolist()}")
    return e[..., i] * _EM


def figure1(
    aia171,
    bp_em,
    bp_status: np.ndarray,
    net_em,
    logt: Sequence[float],
    at_logt: float = 5.9,
    wcs=None,
    path: str | None = None,
    title: str | None = None,
):
    """DeepEM's Figure-1 layout: AIA 171 Å | BP EM at ``at_logt`` (failed pixels black) |
    network EM at ``at_logt``.

    ``aia171`` is (ny, nx) in DN s^-1 pix^-1; ``bp_em`` and ``net_em`` are (ny, nx, n_T) in
    cm^-5; ``bp_status`` is (ny, nx), 0 where BP solved. With ``wcs`` (a 2-D astropy WCS)
    the axes are helioprojective. Returns a matplotlib ``Figure`` (not registered with pyplot);
    saves a PNG atomically if ``path``.
    """
    import matplotlib
    import sunpy.visualization.colormaps  # noqa: F401  (registers the sdoaia colormaps)
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    img = to_value(aia171, u.DN / (u.s * u.pix), "aia171", allow_plain=True)
    bp = em_at_logt(bp_em, logt, at_logt).to_value(_EM)
    net = em_at_logt(net_em, logt, at_logt).to_value(_EM)
    status = np.asarray(bp_status)
    if not (img.shape == bp.shape == net.shape == status.shape):
        raise ValueError(
            f"shapes differ: aia171 {img.shape}, BP {bp.shape}, net {net.shape}, "
            f"status {status.shape}"
        )
    failed = status != 0
    good = np.concatenate([bp[~failed & (bp > 0)], net[net > 0]])
    vmin, vmax = np.percentile(good, [1, 99.5]) if good.size else (1e24, 1e28)
    norm = LogNorm(vmin=max(vmin, 1e20), vmax=max(vmax, vmin * 10))
    kw = {"projection": wcs} if wcs is not None else {}
    fig = Figure(figsize=(14, 4.8))
    axes = [fig.add_subplot(1, 3, i + 1, **kw) for i in range(3)]
    pos = img[np.isfinite(img) & (img > 0)]
    im0 = axes[0].imshow(
        np.clip(img, pos.min() if pos.size else 1e-3, None),
        cmap="sdoaia171",
        norm=LogNorm(*(np.percentile(pos, [1, 99.8]) if pos.size else (1e-1, 1e4))),
        origin="lower",
    )
    fig.colorbar(im0, ax=axes[0], label="AIA 171 Å [DN s$^{-1}$ pix$^{-1}$]", shrink=0.8)
    cmap = matplotlib.colormaps["inferno"].copy()
    cmap.set_bad("black")
    # zero EM is drawn at the bottom of the colour scale; only BP failures are black
    bp_show = np.ma.masked_where(failed | ~np.isfinite(bp), np.clip(bp, norm.vmin, None))
    im1 = axes[1].imshow(bp_show, cmap=cmap, norm=norm, origin="lower")
    net_show = np.ma.masked_where(~np.isfinite(net), np.clip(net, norm.vmin, None))
    im2 = axes[2].imshow(net_show, cmap=cmap, norm=norm, origin="lower")
    for ax, im in ((axes[1], im1), (axes[2], im2)):
        fig.colorbar(im, ax=ax, label=f"EM(log T={at_logt:.1f}) [cm$^{{-5}}$]", shrink=0.8)
    axes[0].set_title("AIA 171 Å")
    axes[1].set_title(f"BP, log T = {at_logt:.1f} (failed {failed.mean() * 100:.2f}%: black)")
    axes[2].set_title(f"DeepEM network, log T = {at_logt:.1f}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig
