"""Local tooling: the CLI, the processes `trex-serve up` runs, embedded services, the in-process
gateway and the mock upstream."""
