"""Users, roles and their permissions on key ranges (docs/security.md, "Users and roles"):
the rules (rules.py) and their changes by compare-and-set (admin.py). Routers enforce
them (shardnode/routing/access.py)."""
