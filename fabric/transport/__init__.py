"""The AMQP adapter (the only place aio-pika is used)."""
