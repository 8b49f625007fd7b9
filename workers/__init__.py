"""Example agents shipped with fabric."""
