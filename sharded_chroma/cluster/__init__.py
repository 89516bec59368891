"""The shards of a topology: replica sets, fan-out over them, and the servers' shared facts."""
