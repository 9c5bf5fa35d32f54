"""Test infrastructure that starts real processes over real sockets on 127.0.0.1.

Integration and fault tests share these helpers so each test states its scenario, not the plumbing:
a real mosquitto broker, moto's server mode as the Kinesis endpoint, the gateway as a subprocess,
a seq-stamping publisher, the delivery oracle, an HTTP fault proxy in front of Kinesis and a TCP
proxy between gateway and broker. Every process started here is stopped by its pid.
"""
