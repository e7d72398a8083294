"""HTTP server: Immich's /predict contract, errors and metrics."""
