"""Concept readout: vector file formats, projection math and the vector trainer.

Importable anywhere; no vLLM imports (the vLLM hook that calls it lives in
``hogwild.plugin``). Arrives with the readout issue.
"""
