"""The worker runtime: agents, handlers, consume loop, heartbeats."""
