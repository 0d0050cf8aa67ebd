"""The plugin's code that runs in vLLM's API server process(es).

Routes (``routes``, ``schemas``), keys and limits (``auth``, ``limits``, ``paths``),
the work behind the routes (``frontend``, ``validation``, ``scoring``), the trainer's
client and supervisor (``trainer_client``, ``trainer_process``), and readout's
response rewriting (``readout_http``, ``readout_inbox``, ``readout_frontend``), and
the weights' version on completions (``weights_version_header``). It
talks to the engine only through public ``EngineClient`` methods, and to the trainer
over the wire protocol (``hogwild.contracts``); it imports no trainer, loss,
optimizer or view model, and of ``model_runner`` only ``vllm_internals``, the list of
every vLLM internal the plugin uses (``tests/test_layout.py`` checks it).
"""
