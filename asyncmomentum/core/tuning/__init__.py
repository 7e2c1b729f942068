"""From staleness to momentum: the formulas, the rules and the tuner that runs them."""
