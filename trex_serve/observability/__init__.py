"""What each request leaves behind for operators: Prometheus metrics, the request record, and
OpenTelemetry traces."""
