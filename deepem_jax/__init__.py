"""deepem_jax: differential emission measure inversion of SDO/AIA images in JAX."""

from .basis import Basis as Basis
from .basis import cheung_basis as cheung_basis
from .basis import dictionary as dictionary
from .forward import forward as forward
from .forward import predict_intensities as predict_intensities
from .response import AIA_CHANNELS as AIA_CHANNELS
from .response import TemperatureResponse as TemperatureResponse
from .response import default_response as default_response
from .uncertainty import ErrorTable as ErrorTable
from .uncertainty import aia_sigma as aia_sigma
from .uncertainty import estimate_error as estimate_error

__version__ = "0.1.0"
