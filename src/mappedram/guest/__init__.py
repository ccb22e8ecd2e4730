"""The micro-VM's guest: workload.S (the source) and workload.py (its bytes, generated)."""
