"""The FX pass, one job per module: trace, match, schedule, rewrite, and the training hooks."""
