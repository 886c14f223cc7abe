"""MSR-UTMOS: sampling-rate-independent MOS prediction."""
__version__ = "0.1.0"
