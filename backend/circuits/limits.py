"""Ranges and defaults the PIE engine, the CLI and the API share (one definition each; no torch)."""

MAX_K = 100_000  # occurrences kept per prompt (a prompt of the demo has ~10^4 active ones)
# Equivalence margin of the effective-budget TOST, in nats of last-token KL: A at K and the base
# method at K' count as equivalent when the mean per-prompt difference is within +-margin.
DEFAULT_TOST_MARGIN = 0.05
