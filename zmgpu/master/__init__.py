"""zmgpu-master: the daemon that queues jobs and places them on node agents' GPUs."""
