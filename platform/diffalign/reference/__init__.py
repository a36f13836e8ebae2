"""Reference policies (none, frozen, periodic, periodic_threshold) and the KL(ref||init) estimate."""

from diffalign.reference.divergence import estimate_reference_kl
from diffalign.reference.names import ON_EXCEED, STRATEGIES
from diffalign.reference.policies import PendingErrors, ReferencePolicy, build_reference

__all__ = ["ON_EXCEED", "STRATEGIES", "PendingErrors", "ReferencePolicy", "build_reference",
           "estimate_reference_kl"]
