"""Broker topology: what must exist on RabbitMQ, named in one place and declared from frozen specs."""
