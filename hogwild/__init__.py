"""vllm-hogwild: train the model that vLLM is serving, in place, while it serves.

Sub-packages, by the process they run in:
- ``hogwild.plugin.api_server``: in vLLM's API server process(es): routes, the trainer's client
- ``hogwild.plugin.model_runner``: in vLLM's model worker: live weights, publishing them, the readout tap
- ``hogwild.worker``: the long-lived training subprocess
- ``hogwild.contracts``: what those processes exchange (wire protocol, weight manifest,
  readout wire format, each training mode's options); imported by all of them
- ``hogwild.training``: losses, optimizer set-up and trainers (anywhere; no vLLM imports)
- ``hogwild.readout``: concept readout formats and trainer (anywhere; no vLLM imports)
"""

__version__ = "0.1.0"
