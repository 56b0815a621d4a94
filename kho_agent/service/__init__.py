"""The D-Bus face of kho-agentd: the contract (interfaces.py), the objects, jobs, authorization."""
