"""The one hop from an ingress replica to a provider-pool replica: what both sides agree on, the
ingress's relay, and the pool's HTTP server."""
