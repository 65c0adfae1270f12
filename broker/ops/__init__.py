"""Operations: the Prometheus collector, /metrics /healthz /readyz, and ``--workers N`` processes."""
