"""The per-message path: routing, the sink, the dead letters, the in-order ack (``pipeline``),
and its seams with the route table, the MQTT loop and the sink (``ports``)."""
