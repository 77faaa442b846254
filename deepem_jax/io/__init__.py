"""Input/output: AIA images -> channels-last intensity stacks; DEM cubes <-> FITS / NDCube.

Arrays in memory are channels-last, ``(ny, nx, n_channels)`` and ``(ny, nx, n_T)``; DEM cubes
on disk are ``(n_T, ny, nx)`` FITS images with a log T third WCS axis.
"""

from ._aia import AIA_EUV_CHANNELS as AIA_EUV_CHANNELS
from ._aia import AIAFileError as AIAFileError
from ._aia import AIAStack as AIAStack
from ._aia import PixelFlag as PixelFlag
from ._aia import load_aia as load_aia
from ._demcube import DEMCube as DEMCube
from ._demcube import read_dem_cube as read_dem_cube
from ._demcube import write_dem_cube as write_dem_cube

__all__ = [
    "AIA_EUV_CHANNELS",
    "AIAFileError",
    "AIAStack",
    "DEMCube",
    "PixelFlag",
    "load_aia",
    "read_dem_cube",
    "write_dem_cube",
]
