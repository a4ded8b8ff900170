"""Operating the services: `telepathy serve` (one role), `up` (all of them locally), `bench`, `healthcheck`."""
