"""Reference policies (none, frozen, periodic, periodic_threshold) and the KL(ref||init) estimate."""

from diffalign.reference.divergence import estimate_reference_kl
from diffalign.reference.policies import (
    ON_EXCEED,
    REFERENCE_DTYPES,
    STRATEGIES,
    PendingErrors,
    ReferencePolicy,
    build_reference,
    resolve_reference_dtype,
)

__all__ = ["ON_EXCEED", "REFERENCE_DTYPES", "STRATEGIES", "PendingErrors", "ReferencePolicy",
           "build_reference", "estimate_reference_kl", "resolve_reference_dtype"]
