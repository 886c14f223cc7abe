"""MSR-UTMOS: speech MOS prediction at any sampling rate, without resampling.

    import msr_utmos_cli as utmos
    model = utmos.load_model()            # the bundled default model, on CUDA when available
    mos = model.score(wave, sr)           # (T,), (B, T) or (T, C) at any rate from 8 to 192 kHz -> (B,)
    rows = model.score_files(paths)       # one Row (path, sample_rate, duration_s, mos, error, bandwidth_hz) per file
"""
__version__ = "0.11.0"

_LAZY = {  # imported on first use, so `utmos report` does not pay for importing torch
    "load_model": "checkpoint", "save_model": "checkpoint", "available_models": "checkpoint",
    "ModelLoadError": "checkpoint", "ModelConfig": "model", "MOSModel": "model", "PRESETS": "model",
    "score_files": "scoring", "Row": "rows", "AudioError": "audio",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
