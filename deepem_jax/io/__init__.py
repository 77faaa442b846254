"""Input/output: AIA images -> channels-last intensity stacks; DEM cubes <-> FITS / NDCube;
the original DeepEM PyTorch weights -> :class:`deepem_jax.predictor.Predictor`.

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
from ._pytorch import load_pytorch_deepem as load_pytorch_deepem
from ._pytorch import read_torch_state_dict as read_torch_state_dict

__all__ = [
    "AIA_EUV_CHANNELS",
    "AIAFileError",
    "AIAStack",
    "DEMCube",
    "PixelFlag",
    "load_aia",
    "load_pytorch_deepem",
    "read_dem_cube",
    "read_torch_state_dict",
    "write_dem_cube",
]
