"""deepem_jax: differential emission measure inversion of SDO/AIA images in JAX.

Start with :func:`invert` (observation in, :class:`DEMResult` out, for every method).
Submodules: ``response``, ``calibration``, ``basis``, ``forward``, ``uncertainty``
(instrument physics); ``bp`` (Basis Pursuit); ``consistency`` (EM moved into BP's tolerance
band); ``model``, ``train``, ``checkpoint``, ``metrics``, ``pretrained`` (the DeepEM network);
``invert``, ``result``, ``status`` (the one pipeline); ``io``, ``data``, ``products`` (files,
registry, maps and figures).
"""

from . import bp as bp
from . import data as data
from .basis import Basis as Basis
from .basis import cheung_basis as cheung_basis
from .basis import dictionary as dictionary
from .bp import BPResult as BPResult
from .bp import BPStatus as BPStatus
from .bp import LPResult as LPResult
from .bp import solve_lp as solve_lp
from .calibration import Degradation as Degradation
from .calibration import degradation as degradation
from .checkpoint import Checkpoint as Checkpoint
from .checkpoint import CheckpointError as CheckpointError
from .checkpoint import load_checkpoint as load_checkpoint
from .checkpoint import load_predictor as load_predictor
from .checkpoint import save_checkpoint as save_checkpoint
from .consistency import ConsistencyResult as ConsistencyResult
from .consistency import project_to_band as project_to_band
from .forward import forward as forward
from .forward import predict_intensities as predict_intensities
from .forward import synthetic_scene as synthetic_scene
from .io import AIAFileError as AIAFileError
from .io import AIAStack as AIAStack
from .io import DEMCube as DEMCube
from .io import load_aia as load_aia
from .io import load_pytorch_deepem as load_pytorch_deepem
from .io import read_dem_cube as read_dem_cube
from .io import write_dem_cube as write_dem_cube
from .metrics import evaluate_fidelity as evaluate_fidelity
from .metrics import format_metrics_table as format_metrics_table
from .model import ModelConfig as ModelConfig
from .pipeline import DEMWarning as DEMWarning
from .pipeline import invert as invert
from .predictor import Predictor as Predictor
from .response import AIA_CHANNELS as AIA_CHANNELS
from .response import DEEPEM_LOGT as DEEPEM_LOGT
from .response import TemperatureResponse as TemperatureResponse
from .response import default_response as default_response
from .result import DEMResult as DEMResult
from .series import SeriesResult as SeriesResult
from .series import invert_series as invert_series
from .status import DEMStatus as DEMStatus
from .uncertainty import V3_ERROR_TABLE as V3_ERROR_TABLE
from .uncertainty import ErrorTable as ErrorTable
from .uncertainty import aia_sigma as aia_sigma
from .uncertainty import estimate_error as estimate_error

__version__ = "0.1.0"
