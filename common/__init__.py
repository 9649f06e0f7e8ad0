"""What the launcher, the router and the shards share: request bounds and defaults, logging, hub access."""
