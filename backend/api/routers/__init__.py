"""One router per resource: meta (listings), jobs, circuits, sweeps, features (+ interpretation)."""
