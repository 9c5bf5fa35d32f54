"""mqtt-kinesis-gateway: MQTT topic filters routed into Kinesis Data Streams, at least once."""

__version__ = "0.1.0"
__all__ = ["__version__"]
