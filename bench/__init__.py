"""`make bench`: fabric measured against a raw aio-pika + msgpack round trip in the same run (issue 6).

A benchmark, never a timed test: ``python -m bench.run [--quick] [--rounds R] [--full]``.
"""
