"""Reference strategy names and their defaults, in one place for the strategies and the config."""

STRATEGIES = ("none", "frozen", "periodic", "periodic_threshold")
ON_EXCEED = ("freeze", "reinit")
DIVERGENCES = ("signed", "eps_mse")  # drift estimators of `divergence.py`
DEFAULT_TAU = 32  # update period (Kang et al. search {16, 32, 64})
DEFAULT_DELTA = 0.005  # KL(ref||init) bound (Kang et al.: 0.005 SD1.5, 0.002 SDXL)
DEFAULT_ON_EXCEED = "freeze"
DEFAULT_DIVERGENCE = "signed"  # Kang et al. eq. 8
DEFAULT_DIVERGENCE_SAMPLES = 16  # chosen latents per rank in the fixed probe set
