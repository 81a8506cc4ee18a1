"""The node agent, ``zmgpu-node``: offers this host's GPUs to the master and runs the job ranks it dispatches."""
