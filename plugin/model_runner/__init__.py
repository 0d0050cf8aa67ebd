"""The plugin's code that runs in vLLM's model worker process (around its model runner).

``general.register`` (the ``vllm.general_plugins`` entry point, run in every vLLM
process) installs what matters here: weights kept live on CPU (``live_weights``),
publishing them with where each Hugging Face tensor lies in them after load
(``weight_export``, ``weight_mapping``), Qwen3-VL/3.5 imports without torchvision
(``torchvision_free``), the readout tap (``readout_tap``), and for served adapters the CPU
LoRA rows of base requests zeroed (``lora_rows``) and an adapter's new factors taken when the
trainer changed it (``adapter_refresh``). Every vLLM internal it
relies on is reached through ``vllm_internals``. (The training subprocess is another
package: ``hogwild.worker``.)
"""
