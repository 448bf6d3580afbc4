"""The routing brain: instance state, policies, proxy-side queues and the monitor."""
