"""MSR-UTMOS: naturalness MOS prediction at any sampling rate, without resampling.

    import msr_utmos_cli as utmos
    model = utmos.load_model()            # the bundled default model, on CUDA when available
    mos = model.score(wave, sr)           # (T,) or (B, T) at any rate from 8 to 192 kHz -> (B,)
"""
__version__ = "0.1.0"

from .checkpoint import ModelLoadError, available_models, load_model, save_model  # noqa: E402
from .model import PRESETS, ModelConfig, MOSModel  # noqa: E402

__all__ = ["load_model", "save_model", "available_models", "ModelLoadError", "ModelConfig", "MOSModel",
           "PRESETS", "__version__"]
