"""The gRPC edge: servicer, status codes, security, metrics, logs, faults, shutdown, load."""
