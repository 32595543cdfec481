"""Agents, timers and web pages of the stream app."""

from streams.agents import usage, web  # noqa: F401
