"""Training algorithms: losses, batching, optimizer set-up and trainers.

Importable anywhere, free of vLLM imports: the trainers here work on any Hugging
Face causal LM, whether its parameters are ordinary tensors or views of the
weights a vLLM server is serving.
"""
