"""What lets several CSC nodes act as one: routing state in Redis, node-to-node peer links."""
