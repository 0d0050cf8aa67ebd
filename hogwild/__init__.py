"""vllm-hogwild: train the model that vLLM is serving, in place, while it serves.

Sub-packages, by the process they run in:
- ``hogwild.plugin``: inside vLLM's processes (API server routes, worker patches)
- ``hogwild.worker``: the long-lived training subprocess and its wire protocol
- ``hogwild.training``: losses, optimizer set-up and trainers (no vLLM imports)
- ``hogwild.readout``: concept readout formats and trainer (no vLLM imports)
"""

__version__ = "0.1.0"
