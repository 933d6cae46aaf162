"""The server's routes, one router a module, by what they are for: ``health`` (liveness,
readiness, the server, the metrics: open), ``models`` (the model's metadata and scoring: API
key), ``admin`` (the model repository's reload: admin token)."""
