"""The worker process: one member of one Raft group (`python -m worker`)."""
