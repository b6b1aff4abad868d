"""The router process: one per host, the clients' entry point (`python -m router`)."""
