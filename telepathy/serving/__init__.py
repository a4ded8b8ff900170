"""gRPC plumbing every service shares: server, channels, auth, errors, metrics, batcher, lifecycle, pb conversion."""
