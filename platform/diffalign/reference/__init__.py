"""Reference policies (none, frozen, periodic, periodic_threshold) and the KL(ref||init) estimate."""

from diffalign.reference.divergence import Estimate, estimate_reference_kl, gather_probe
from diffalign.reference.names import DIVERGENCES, ON_EXCEED, STRATEGIES
from diffalign.reference.policies import PendingErrors, ReferencePolicy, build_reference

__all__ = ["DIVERGENCES", "ON_EXCEED", "STRATEGIES", "Estimate", "PendingErrors", "ReferencePolicy",
           "build_reference", "estimate_reference_kl", "gather_probe"]
