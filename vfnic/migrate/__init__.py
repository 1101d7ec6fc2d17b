"""Live migration of a VM and its vfnic VF: the orchestrator and the two-host lab."""
