"""The wire protocol: typed messages, header names and the codec. Pure: no I/O."""
