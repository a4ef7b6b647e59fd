"""Running a filter file: parameters, feature building, thresholds, the single-``uid`` result
check, the subset and manifest; locally (``runner``) or per pool file on Ray (``ray``); lint."""
