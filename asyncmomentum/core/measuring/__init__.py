"""What a run observes: staleness (clock and estimator), momentum meter, curvature, metrics."""
