"""The embedded digits testbed's own pieces: its data (scikit-learn's 8×8 digits), the held-out
metrics that training never sees, and the pretraining that reproduces the shipped weights.

The testbed's backbone and rewards live with the others (``flowbp.backbones.digits``,
``flowbp.rewards.digits``) because they implement the same protocols as the real ones.
"""
