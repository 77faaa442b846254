"""DEM products from EM cubes (channels-last: EM has shape (..., n_T), cm^-5 per log T bin),
the DeepEM Figure-1 layout and summary maps of a DEM cube.

EM may be given as a Quantity (converted to cm^-5) or a plain array taken to be in cm^-5.
Pixels with zero or non-finite total EM get NaN mean temperatures (never a silent zero).

In the figures EM is drawn on ``inferno`` (zero EM at the dark bottom of the scale); pixels the
inversion flagged have colours of their own, named in a legend: BP failures
:data:`FAILED_COLOR`, network EM outside BP's tolerance band :data:`OUT_OF_BAND_COLOR`. With a
WCS the axes are labelled as sunpy labels its maps (e.g. "Helioprojective Longitude
(Solar-X) [arcsec]").
"""

from collections.abc import Sequence

import astropy.units as u
import numpy as np

from ._atomic import save_figure
from ._units import to_value

__all__ = [
    "FAILED_COLOR",
    "NO_EM_COLOR",
    "OUT_OF_BAND_COLOR",
    "dem_maps",
    "em_at_logt",
    "em_in_range",
    "figure1",
    "mean_logt",
    "total_em",
]

_EM = u.cm**-5
#: Colour of pixels an inversion failed on (not on the ``inferno`` or ``viridis`` scales).
FAILED_COLOR = "#00e5ff"
#: Colour of network pixels whose EM lies outside BP's tolerance band.
OUT_OF_BAND_COLOR = "#3050ff"
#: Colour of pixels without emission, where the EM-weighted log T is undefined.
NO_EM_COLOR = "#b0b0b0"
_PANEL_WIDTH = 4.6  # inches of one map panel; its colour bar is below it


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


def _map_axes(fig, n: int, wcs) -> list:
    """``n`` image axes side by side, with WCS (labelled as sunpy maps, in arcsec) or pixel
    labels; only the first carries the y label."""
    from sunpy.visualization import axis_labels_from_ctype

    kw = {"projection": wcs} if wcs is not None else {}
    axes = [fig.add_subplot(1, n, i + 1, **kw) for i in range(n)]
    for i, ax in enumerate(axes):
        if wcs is None:
            ax.set_xlabel("x [pixel]")
            ax.set_ylabel("y [pixel]" if i == 0 else "")
            continue
        for k, coord in enumerate(ax.coords[:2]):
            angle = coord.coord_type in ("longitude", "latitude")
            if angle:
                coord.set_format_unit(u.arcsec, decimal=True, show_decimal_unit=False)
            label = axis_labels_from_ctype(wcs.wcs.ctype[k], "arcsec" if angle else None)
            coord.set_axislabel(label if k == 0 or i == 0 else " ")
    return axes


def _figure(n: int, shape: tuple[int, int]):
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    # the map is about 0.5 inch narrower than its panel; titles, tick labels, colour bar,
    # legend and suptitle take about 2.3 inches of height
    aspect = shape[0] / shape[1]
    height = min(max((_PANEL_WIDTH - 0.5) * aspect + 2.3, 4.0), 14.0)
    return Figure(figsize=(_PANEL_WIDTH * n, height), layout="constrained")


def _em_norm(*maps: np.ndarray):
    from matplotlib.colors import LogNorm

    good = np.concatenate([m[np.isfinite(m) & (m > 0)] for m in maps])
    vmin, vmax = np.percentile(good, [1, 99.5]) if good.size else (1e24, 1e28)
    return LogNorm(vmin=max(vmin, 1e20), vmax=max(vmax, vmin * 10))


def _draw(fig, ax, values: np.ndarray, norm, cmap: str, flags, label: str):
    """``values`` on ``cmap`` (values outside the scale, zero EM included, at its ends) with
    each ``(mask, colour)`` of ``flags`` painted over, and a colour bar; returns the colour of
    the bottom of the scale."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import to_rgba

    cm = matplotlib.colormaps[cmap]
    v = np.clip(np.where(np.isfinite(values), values, norm.vmin), norm.vmin, norm.vmax)
    rgba = cm(np.ma.getdata(norm(v)))
    for mask, color in flags:
        rgba[mask] = to_rgba(color)
    ax.imshow(rgba, origin="lower")
    _colorbar(fig, ScalarMappable(norm=norm, cmap=cm), ax, label)
    return cm(0.0)


def _colorbar(fig, mappable, ax, label: str) -> None:
    fig.colorbar(mappable, ax=ax, label=label, location="bottom", shrink=0.9, aspect=30)


def _legend(fig, entries: list[tuple[object, str]], ncols: int) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=c, edgecolor="0.3", label=label) for c, label in entries]
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, frameon=False)


def _finish(fig, title: str | None, path: str | None, metadata: dict[str, str] | None = None):
    if title:
        fig.suptitle(title, wrap=True)
    if path is not None:
        save_figure(fig, path, metadata=metadata)
    return fig


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
    *,
    net_out_of_band: np.ndarray | None = None,
):
    """DeepEM's Figure-1 layout: AIA 171 Å | BP EM at ``at_logt`` | network EM at ``at_logt``.

    ``aia171`` is (ny, nx) in DN s^-1 pix^-1; ``bp_em`` and ``net_em`` are (ny, nx, n_T) in
    cm^-5; ``bp_status`` is (ny, nx), 0 where BP solved; ``net_out_of_band`` (ny, nx) is True
    where the network's EM lies outside BP's tolerance band. BP failures (and non-finite BP
    EM) are drawn in :data:`FAILED_COLOR`, flagged network pixels (and non-finite network EM)
    in :data:`OUT_OF_BAND_COLOR`, both named in a legend with their share of the image; zero
    EM is the dark bottom of the shared colour scale. With ``wcs`` (a 2-D astropy WCS) the
    axes are helioprojective in arcsec. Returns a matplotlib ``Figure`` (not registered with
    pyplot); saves a PNG atomically if ``path``.
    """
    import sunpy.visualization.colormaps  # noqa: F401  (registers the sdoaia colormaps)
    from matplotlib.colors import LogNorm

    img = to_value(aia171, u.DN / (u.s * u.pix), "aia171", allow_plain=True)
    bp = em_at_logt(bp_em, logt, at_logt).to_value(_EM)
    net = em_at_logt(net_em, logt, at_logt).to_value(_EM)
    status = np.asarray(bp_status)
    oob = np.zeros(net.shape, bool) if net_out_of_band is None else np.asarray(net_out_of_band)
    if not (img.shape == bp.shape == net.shape == status.shape == oob.shape):
        raise ValueError(
            f"shapes differ: aia171 {img.shape}, BP {bp.shape}, net {net.shape}, "
            f"status {status.shape}, net_out_of_band {oob.shape}"
        )
    if oob.dtype != bool:
        raise TypeError(f"net_out_of_band must be a boolean mask, got dtype {oob.dtype}")
    failed = (status != 0) | ~np.isfinite(bp)
    no_net = ~np.isfinite(net)  # no network EM (invalid input): drawn like a BP failure
    flagged = oob & ~no_net
    norm = _em_norm(bp[~failed], net[~(flagged | no_net)])
    fig = _figure(3, img.shape)
    axes = _map_axes(fig, 3, wcs)
    pos = img[np.isfinite(img) & (img > 0)]
    im0 = axes[0].imshow(
        np.clip(img, pos.min() if pos.size else 1e-3, None),
        cmap="sdoaia171",
        norm=LogNorm(*(np.percentile(pos, [1, 99.8]) if pos.size else (1e-1, 1e4))),
        origin="lower",
    )
    _colorbar(fig, im0, axes[0], "AIA 171 Å [DN s$^{-1}$ pix$^{-1}$]")
    label = "EM per log T bin [cm$^{-5}$]"
    low = _draw(fig, axes[1], bp, norm, "inferno", [(failed, FAILED_COLOR)], label)
    net_flags = [(no_net, FAILED_COLOR), (flagged, OUT_OF_BAND_COLOR)]
    _draw(fig, axes[2], net, norm, "inferno", net_flags, label)
    axes[0].set_title("AIA 171 Å")
    axes[1].set_title(f"Basis Pursuit: EM at log T = {at_logt:.2f}")
    axes[2].set_title(f"DeepEM network: EM at log T = {at_logt:.2f}")
    _legend(
        fig,
        [
            (low, f"EM ≤ {norm.vmin:.1e} cm$^{{-5}}$, zero included"),
            (
                FAILED_COLOR,
                f"no EM (invalid input, BP infeasible): BP {failed.mean():.2%}, network "
                f"{no_net.mean():.2%}",
            ),
            (OUT_OF_BAND_COLOR, f"network EM outside BP's band ({flagged.mean():.2%})"),
        ],
        ncols=3,
    )
    return _finish(fig, title, path)


def compare_figure(bp, net, *, at_logt: float = 5.9, path: str | None = None, title=None):
    """:func:`figure1` of two :class:`~deepem_jax.DEMResult` of the same image (BP and the
    network, with 171 Å among the channels): the observed 171 Å intensities, both EMs at
    ``at_logt``, BP's failures and the network's out-of-band pixels."""
    from .status import DEMStatus

    return figure1(
        bp.intensities[..., bp.channels.index(171)],
        bp.em,
        bp.status,
        net.em,
        bp.logt,
        at_logt=at_logt,
        wcs=bp.wcs,
        path=None if path is None else str(path),
        title=title,
        net_out_of_band=net.status == DEMStatus.OUTSIDE_BAND,
    )


def dem_maps(
    em,
    logt: Sequence[float],
    status: np.ndarray,
    *,
    wcs=None,
    path: str | None = None,
    title: str | None = None,
    metadata: dict[str, str] | None = None,
):
    """Summary maps of a DEM cube: total EM (cm^-5) | EM-weighted mean log10(T / K).

    ``em`` is (ny, nx, n_T) in cm^-5 and ``status`` (ny, nx), 0 where the inversion succeeded;
    flagged pixels and pixels with non-finite total EM are drawn in :data:`FAILED_COLOR`;
    zero total EM is the dark bottom of the EM scale, and its undefined log T is drawn in
    :data:`NO_EM_COLOR` (all named in a legend with their share). ``wcs``, ``path`` and
    ``title`` as in :func:`figure1`. Returns a matplotlib ``Figure`` (not registered with
    pyplot); saves a PNG atomically if ``path``, with ``metadata`` as its text chunks.
    """
    from matplotlib.colors import Normalize

    lt = _grid(logt, _em(em).shape[-1])
    tot = total_em(em).to_value(_EM)
    mt = mean_logt(em, lt)
    st = np.asarray(status)
    if st.shape != tot.shape:
        raise ValueError(f"shapes differ: em {tot.shape} (ny, nx), status {st.shape}")
    failed = (st != 0) | ~np.isfinite(tot)
    no_em = ~failed & ~np.isfinite(mt)
    fig = _figure(2, tot.shape)
    axes = _map_axes(fig, 2, wcs)
    norm = _em_norm(tot[~failed])
    flags = [(failed, FAILED_COLOR)]
    label = "total EM [cm$^{-5}$]"
    low = _draw(fig, axes[0], tot, norm, "inferno", flags, label)
    t_norm = Normalize(lt[0], lt[-1])
    label = "EM-weighted log$_{10}$(T / K)"
    _draw(fig, axes[1], mt, t_norm, "viridis", [*flags, (no_em, NO_EM_COLOR)], label)
    axes[0].set_title("Total EM")
    axes[1].set_title("EM-weighted mean log T")
    _legend(
        fig,
        [
            (low, f"total EM ≤ {norm.vmin:.1e} cm$^{{-5}}$, zero included"),
            (FAILED_COLOR, f"flagged ({failed.mean():.2%})"),
            (NO_EM_COLOR, f"no EM: mean log T undefined ({no_em.mean():.2%})"),
        ],
        ncols=2,
    )
    return _finish(fig, title, path, metadata)
