"""What the agent and the collector share; imports nothing from either role.

The model and its protobuf codec, the one exception tree, systemd notify and stop
signals, files reloaded on change, counters, OTLP settings and the wire constants.
"""

__all__: list[str] = []
