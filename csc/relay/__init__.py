"""The data plane of the CSC: what carries bootloader traffic (the public HTTP listener and the
TCP ingress, the agent gateway and its WebSocket, routing, the registry of live sessions,
limits, traffic counters and the access log).
"""
