"""The HTTP surface: the data plane app, the operator and account APIs, and the dashboard."""
