"""Site validation: labels, statistics, the site calibration and the report (`pacsbridge validate`)."""
