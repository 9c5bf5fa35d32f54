"""MQTT side: the paho adapter and the in-order acknowledgement tracker."""
