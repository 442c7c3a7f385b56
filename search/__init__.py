"""CLIs (run, worker, export, apply, dashboard), named studies, samplers, early stopping."""
