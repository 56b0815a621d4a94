"""The D-Bus face of kho-agentd: the contract (contract.py, names in interfaces.py), the objects,
jobs, authorization, and the handlers that read in order (steps.py)."""
