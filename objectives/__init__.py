"""A trial's measurements: accuracy, compression ratio (from real bytes), BitOPs, and the Optuna
objective that ties a plan to them. Sizes always come from :mod:`storage.codec`, never from
parameter counts."""
