"""A fault-injectable mock upstream speaking the OpenAI APIs (chat completions, Responses, models)
and the Anthropic Messages API (a real HTTP server process). Behaviour is switchable at run time:
POST /_control with any of the Faults fields. Used by the offline demo, the tests, the benchmarks
and the load tests; run it with ``python -m trex_serve.local.mock_upstream`` or
``trex-serve mock-upstream``.

``server.py`` holds the server, the control endpoints and the fault injection; ``openai.py`` the
OpenAI-shaped answers; ``anthropic.py`` the Anthropic Messages answers."""
