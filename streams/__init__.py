"""The faust-streaming app: topics, agents and housekeeping timers."""
