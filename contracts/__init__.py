"""Contracts between the project's processes, importable by every one of them.

The wire protocol between vLLM's API server and the training subprocess
(``protocol``), the weight manifest vLLM's model worker publishes for the trainer
(``manifest``), the readout wire format from the model worker to the API server
(``readout_wire``), and the options of each training mode (``*_config``: plain
pydantic classes the trainers import, never the reverse). Nothing here imports
torch, a trainer or vLLM.
"""
