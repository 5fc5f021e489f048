"""The worker registry, which gateway, controller and worker all depend on (never on each
other): `protocol` (the `Registry` interface and `open_registry`), `records` (what is
stored, and what a worker tells the controller), and its two backends, `memory_backend`
and `redis_backend`."""
