"""What a run observes: staleness (clock and estimator), the momentum meter, the curvature,
metrics."""
