"""The model runtime every harness shares: batched chat generation (and the server's engine) and
log-likelihood scoring, both with an intervention applied."""
