"""fleet-ingress: a TLS WebSocket ingress in front of voice-call fleets."""

__version__ = "0.1.0"
