"""flowbp: reward backpropagation for flow matching — one surrogate engine, every method as a plan."""

from flowbp.engine import SurrogateOutput, surrogate
from flowbp.losses import reward_loss
from flowbp.methods import available_methods, make_plan
from flowbp.plan import Plan, Segment
from flowbp.trajectory import Trajectory, rollout

__all__ = [
    "Plan",
    "Segment",
    "SurrogateOutput",
    "Trajectory",
    "available_methods",
    "make_plan",
    "reward_loss",
    "rollout",
    "surrogate",
]
__version__ = "0.1.0"
