"""etcd's v3 gRPC API on a router (docs/etcd.md): `requests` translates
etcd's messages to the state machine's operations (storage/etcd_ops.py),
`kv` serves KV through the router's routing, `cluster` the MemberList and
Status that clients ask for, `header` every answer's header, `server`
puts them on the router's gRPC server."""
