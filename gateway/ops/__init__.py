"""Operations: metrics, health endpoints, logging."""
