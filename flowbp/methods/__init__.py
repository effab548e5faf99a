"""Every method is a plan generator registered by name; ``make_plan`` draws one."""

from flowbp.methods import (  # noqa: F401  (registration side effects)
    alignprop,
    coarse_leap,
    custom,
    draft,
    drtune,
    flowbp_bridge,
    flowbp_lagrange,
    flowbp_sparse,
    leapalign,
    refl,
)
from flowbp.methods._registry import available_methods, get_method, make_plan, register

__all__ = ["available_methods", "get_method", "make_plan", "register"]
